"""phi-core 0.10's own outputs: every example file and every golden case, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import phi_session as ps
from phi_session.recorder import SessionRecorder, SessionRecorderConfig

from .conftest import EXAMPLES, GOLDEN

pytestmark = pytest.mark.spec

CODEC = GOLDEN / "codec"
RECORDER = GOLDEN / "recorder"


def _cases(name: str) -> list[dict[str, Any]]:
    path = CODEC / name
    if not path.exists():
        return []
    # The corpus holds raw U+2028 and friends: split on "\n" only.
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n") if line]


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [f"{i}:{c['in'][:40]!r}" for i, c in enumerate(cases)]


EVENTS_ACCEPT = _cases("events.accept.jsonl")
SESSIONS_ACCEPT = _cases("sessions.accept.jsonl")
EVENTS_REJECT = _cases("events.reject.jsonl")
SESSIONS_REJECT = _cases("sessions.reject.jsonl")
EVENTS_OPTIONAL = _cases("events.accept-optional.jsonl")
SESSIONS_OPTIONAL = _cases("sessions.accept-optional.jsonl")
RECORDER_CASES = sorted(p.name for p in RECORDER.iterdir()) if RECORDER.is_dir() else []


def test_corpus_is_present() -> None:
    assert len(EVENTS_ACCEPT) == 562 and len(EVENTS_REJECT) == 210
    assert len(SESSIONS_ACCEPT) == 55 and len(SESSIONS_REJECT) == 38
    assert len(RECORDER_CASES) == 200


@pytest.mark.parametrize("case", EVENTS_ACCEPT, ids=_ids(EVENTS_ACCEPT))
def test_event_accepted_and_rewritten_as_phi_core(case: dict[str, Any]) -> None:
    assert ps.encode(ps.decode_event(case["in"])).decode() == case["out"]


@pytest.mark.parametrize("case", SESSIONS_ACCEPT, ids=_ids(SESSIONS_ACCEPT))
def test_session_accepted_and_rewritten_as_phi_core(case: dict[str, Any]) -> None:
    assert ps.encode(ps.decode_session(case["in"])).decode() == case["out"]


@pytest.mark.parametrize("case", EVENTS_REJECT, ids=_ids(EVENTS_REJECT))
def test_event_rejected(case: dict[str, Any]) -> None:
    with pytest.raises(ps.DecodeError):
        ps.decode_event(case["in"])


@pytest.mark.parametrize("case", SESSIONS_REJECT, ids=_ids(SESSIONS_REJECT))
def test_session_rejected(case: dict[str, Any]) -> None:
    with pytest.raises(ps.DecodeError):
        ps.decode_session(case["in"])


@pytest.mark.parametrize(
    ("case", "decode"),
    [(c, ps.decode_event) for c in EVENTS_OPTIONAL] + [(c, ps.decode_session) for c in SESSIONS_OPTIONAL],
)
def test_optional_spellings_rejected_cleanly_or_read_right(case: dict[str, Any], decode: Any) -> None:
    # Optional per the spec: a reader may reject these, but only with a DecodeError,
    # and what it accepts it must write back as phi-core does.
    try:
        value = decode(case["in"])
    except ps.DecodeError:
        return
    assert ps.encode(value).decode() == case["out"]


def _record(lines: list[bytes], **config: Any) -> list[ps.Session]:
    recorder = SessionRecorder(SessionRecorderConfig(**config))
    for line in lines:
        if line.strip():
            recorder.on_json(line)
    recorder.flush()
    return recorder.drain_completed()


@pytest.mark.parametrize("case", RECORDER_CASES)
def test_recorder_case(case: str, tmp_path: Path) -> None:
    from phi_session.stores.json_dir import JsonDirStore

    directory = RECORDER / case
    config = json.loads((directory / "config.json").read_text())
    sessions = _record((directory / "events.jsonl").read_bytes().split(b"\n"), **config)
    store = JsonDirStore(tmp_path)
    for session in sessions:
        store.save(session)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".json"}
    expected = {p.name: p.read_bytes() for p in (directory / "sessions").iterdir()}
    assert written == expected


EXAMPLE_STREAMS = {
    "basic": ["basic"],
    "minimal": ["minimal"],
    "parallel": ["parallel"],
    "subagent": ["subagent-parent", "subagent-child"],
}


@pytest.mark.parametrize("stream", sorted(EXAMPLE_STREAMS))
def test_example_event_lines_reencode_byte_for_byte(stream: str) -> None:
    lines = (EXAMPLES / f"events-{stream}.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line, the last included, ends with "\n"
    for line in lines[:-1]:
        assert ps.encode(ps.decode_event(line)) == line


@pytest.mark.parametrize("stream", sorted(EXAMPLE_STREAMS))
def test_example_stream_records_to_phi_core_files(stream: str, tmp_path: Path) -> None:
    from phi_session.stores.json_dir import JsonDirStore

    sessions = _record((EXAMPLES / f"events-{stream}.jsonl").read_bytes().split(b"\n"))
    store = JsonDirStore(tmp_path)
    for session in sessions:
        store.save(session)
    written = sorted(p.read_bytes() for p in tmp_path.glob("*.json"))
    expected = sorted((EXAMPLES / f"session-{name}.json").read_bytes() for name in EXAMPLE_STREAMS[stream])
    assert written == expected


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("session-*.json")), ids=lambda p: p.name)
def test_example_session_files_round_trip(path: Path) -> None:
    data = path.read_bytes()
    assert not data.endswith(b"\n")
    assert ps.encode(ps.decode_session(data)) == data


@pytest.mark.parametrize("case", RECORDER_CASES)
def test_recorder_case_saved_after_every_event(case: str, tmp_path: Path) -> None:
    # Checkpoint, drain and save after every single event: sessions are split into as
    # many saves as possible, and the store's merge must still give phi-core's files.
    from phi_session.stores.json_dir import JsonDirStore

    directory = RECORDER / case
    config = json.loads((directory / "config.json").read_text())
    recorder = SessionRecorder(SessionRecorderConfig(**config))
    store = JsonDirStore(tmp_path)
    for line in (directory / "events.jsonl").read_bytes().split(b"\n"):
        if line:
            recorder.on_json(line)
            recorder.checkpoint()
            for session in recorder.drain_completed():
                store.save(session)
    recorder.flush()
    for session in recorder.drain_completed():
        store.save(session)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".json"}
    expected = {p.name: p.read_bytes() for p in (directory / "sessions").iterdir()}
    assert written == expected


def _recorded(feed: Any) -> list[bytes]:
    """What a fresh recorder (every delta kept) holds after `feed(recorder)`: its sessions,
    open loops and orphans, as JSON."""
    recorder = SessionRecorder(SessionRecorderConfig(include_streaming_events=True))
    feed(recorder)
    held = [ps.encode(s) for s in recorder.sessions()]
    held += [ps.encode(e) for s in recorder.sessions() for e in recorder.session_events(s.session_id)]
    held += [ps.encode(o.event) for o in recorder.orphans()]
    return held + [ps.encode(r) for i in recorder.open_loop_ids() if (r := recorder.current_loop(i))]


# What on_json's fast decoding still reads otherwise than phi-core (nesting past 128 levels:
# 34, 35; repeated keys, -0 and integers past 64 bits): finding these would cost a second
# parse of every line (README, "Decoding is strict by default").
_ON_JSON_ACCEPTS = {34, 35, 64, 65, 120, 123, 132, 133, 134, 135, 144, 172}  # reject-file indexes
_ON_JSON_REWRITES = {524, 526, 548, 550, 551}  # accept-file indexes: free-form -0, integers past 64 bits


def _known_gaps(cases: list[dict[str, Any]], gaps: set[int]) -> list[Any]:
    fast_path = pytest.mark.xfail(strict=True, reason="on_json's fast decoding")
    return [pytest.param(c, marks=fast_path) if i in gaps else c for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", _known_gaps(EVENTS_REJECT, _ON_JSON_ACCEPTS), ids=_ids(EVENTS_REJECT))
def test_on_json_refuses_what_phi_core_rejects_and_records_nothing(case: dict[str, Any]) -> None:
    def feed(recorder: SessionRecorder) -> None:
        with pytest.raises(ps.DecodeError):
            recorder.on_json(case["in"])

    assert _recorded(feed) == []


@pytest.mark.parametrize("case", _known_gaps(EVENTS_ACCEPT, _ON_JSON_REWRITES), ids=_ids(EVENTS_ACCEPT))
def test_on_json_records_what_decode_event_and_on_event_record(case: dict[str, Any]) -> None:
    by_json = _recorded(lambda recorder: recorder.on_json(case["in"]))
    assert by_json == _recorded(lambda recorder: recorder.on_event(ps.decode_event(case["in"])))
