"""The broker's settings and partitioning, and its optional dependency: no services needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import phi_session as ps
from phi_session import InvalidArgument
from phi_session.broker import StreamSettings, partition_of
from phi_session.broker.settings import Piece, publications, read_piece


def test_settings_are_validated_with_the_field_named() -> None:
    for bad in (
        {"stream": "a.b"},
        {"stream": ""},
        {"subject_prefix": "a..b"},
        {"subject_prefix": "a.*"},
        {"partitions": 0},
        {"partitions": 1025},
        {"max_bytes": 10},
        {"max_bytes": 1 << 63},  # JetStream's limits are signed 64-bit
        {"max_age": float("inf")},  # in nanoseconds: past 2**63 the stream cannot be created
        {"max_age": 1e10},
        {"duplicate_window": 0},
        {"duplicate_window": 20, "max_age": 10},
    ):
        name = next(iter(bad))
        with pytest.raises(InvalidArgument, match=name):  # a PhiSessionError, not a bare ValueError
            StreamSettings(**bad)  # type: ignore[arg-type]
    for bad in ({"partitions": True}, {"partitions": "8"}, {"stream": 5}, {"subject_prefix": None}):
        name = next(iter(bad))
        with pytest.raises(TypeError, match=name):
            StreamSettings(**bad)  # type: ignore[arg-type]


def test_settings_from_arguments_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHI_SESSION_NATS_PARTITIONS", "3")
    monkeypatch.setenv("PHI_SESSION_NATS_STREAM", "FROM_ENV")
    settings = StreamSettings.from_env(stream="GIVEN", subject_prefix=None)
    assert (settings.stream, settings.partitions, settings.subject_prefix) == ("GIVEN", 3, "phi.events")
    assert settings.subjects() == ["phi.events.0", "phi.events.1", "phi.events.2"]
    monkeypatch.setenv("PHI_SESSION_NATS_MAX_AGE", "soon")
    with pytest.raises(ValueError, match="PHI_SESSION_NATS_MAX_AGE"):
        StreamSettings.from_env()
    with pytest.raises(TypeError, match="colour"):
        StreamSettings.from_env(colour="red")


def test_a_bad_value_from_the_environment_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error named the field ("stream: ...") or called an integer's bad value not a
    number ("expected a number, got '1e9'"): neither says which variable to fix."""
    for name, raw, reason in (
        ("STREAM", "", "expected 1-64 letters"),
        ("SUBJECT_PREFIX", "a b", "expected dot-separated tokens"),
        ("PARTITIONS", "0", "expected an integer from 1 to 1024, got 0"),
        ("MAX_BYTES", "1e9", "expected an integer, got '1e9'"),
        # int() reads these as 40, 40 and 4: a typo taken for another number
        ("PARTITIONS", "4_0", "expected an integer, got '4_0'"),
        ("PARTITIONS", " 40", "expected an integer, got ' 40'"),
        ("PARTITIONS", "\u0664", "expected an integer, got '\u0664'"),
        # past int()'s digit limit: a bare ValueError, naming no variable
        ("MAX_BYTES", "9" * 5_000, "expected an integer, got one of 5000 characters"),
        ("MAX_AGE", "9" * 5_000, "expected a number from"),
        ("DUPLICATE_WINDOW", "1e7", "expected a number from 1 to 604800"),
        # float() reads these as 3600, 60, 60 and 60: the same typos in a number
        ("MAX_AGE", "3_600", "expected a number, got '3_600'"),
        ("MAX_AGE", " 60", "expected a number, got ' 60'"),
        ("MAX_AGE", "60\n", "expected a number, got '60\\n'"),
        ("DUPLICATE_WINDOW", "\u0666\u0660", "expected a number, got '\u0666\u0660'"),
        ("MAX_AGE", "inf", "expected a number, got 'inf'"),
    ):
        with monkeypatch.context() as env:
            env.setenv(f"PHI_SESSION_NATS_{name}", raw)
            with pytest.raises(InvalidArgument) as raised:
                StreamSettings.from_env()
            assert str(raised.value).startswith(f"PHI_SESSION_NATS_{name}: {reason}")
    for raw, seconds in (("3600", 3600.0), ("90.5", 90.5), ("3.6e3", 3600.0), ("1E3", 1000.0)):
        with monkeypatch.context() as env:  # plain decimal notation, fraction and exponent
            env.setenv("PHI_SESSION_NATS_MAX_AGE", raw)
            assert StreamSettings.from_env().max_age == seconds
    with pytest.raises(ValueError, match=r"^partitions: "):  # given, not from the environment
        StreamSettings.from_env(partitions=0)


def test_a_max_age_under_the_default_duplicate_window_shrinks_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PHI_SESSION_NATS_MAX_AGE=60 failed with "duplicate_window: ... got 120.0", a setting
    never set: JetStream wants the window no longer than max_age, so the default one fits it."""
    monkeypatch.setenv("PHI_SESSION_NATS_MAX_AGE", "60")
    settings = StreamSettings.from_env()
    assert (settings.max_age, settings.duplicate_window) == (60.0, 60.0)
    assert StreamSettings.from_env(max_age=30).duplicate_window == 30
    assert StreamSettings.from_env(max_age=3600).duplicate_window == 120
    monkeypatch.setenv("PHI_SESSION_NATS_DUPLICATE_WINDOW", "90")  # set, and too long: named
    with pytest.raises(InvalidArgument, match=r"^PHI_SESSION_NATS_DUPLICATE_WINDOW: .* to 60, got 90"):
        StreamSettings.from_env()


def test_partitions_are_stable_and_spread() -> None:
    assert partition_of("session-1", 8) == partition_of("session-1", 8)
    spread = {partition_of(f"session-{n}", 8) for n in range(200)}
    assert spread == set(range(8))
    assert partition_of("s", 1) == 0
    # AttributeError ('int' object has no attribute 'encode') and ZeroDivisionError.
    with pytest.raises(TypeError, match=r"^key must be str, not int$"):
        partition_of(5, 8)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^partitions must be int, not str$"):
        partition_of("s", "8")  # type: ignore[arg-type]
    for count in (0, -3):  # -3 gave a negative or zero partition
        with pytest.raises(InvalidArgument, match=f"^partitions must be at least 1, got {count}$"):
            partition_of("s", count)


def test_without_nats_py_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['nats'] = None\n"
        "from phi_session.broker import JetStreamSink\n"
        "from phi_session.errors import MissingExtra\n"
        "try:\n    JetStreamSink('nats://127.0.0.1:4222')\n"
        "except MissingExtra as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'phi-session[nats]'" in out.stdout


def test_without_psycopg_the_ingest_worker_names_the_extra() -> None:
    code = (
        "import asyncio, sys; sys.modules['psycopg'] = None\n"
        "from phi_session.broker import ingest_status\n"
        "from phi_session.errors import MissingExtra\n"
        "try:\n    asyncio.run(ingest_status('nats://127.0.0.1:1', 'postgresql://u@127.0.0.1:1/db'))\n"
        "except MissingExtra as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("the ingest worker needs psycopg 3 (")
    assert out.stdout.endswith("): pip install 'phi-session[postgres]'\n")


@pytest.mark.parametrize("port", ["0", "65536", "99999", "x"])
def test_a_nats_url_with_a_port_out_of_range_is_refused(port: str) -> None:
    from phi_session.broker.settings import nats_servers

    assert nats_servers("nats://a:4222, tls://[::1]:65535,nats://b") == [
        "nats://a:4222",
        "tls://[::1]:65535",
        "nats://b",
    ]
    with pytest.raises(InvalidArgument, match=r"'nats://b:.*' \(its port must be a number 1-65535\)$"):
        nats_servers(f"nats://a:4222,nats://b:{port}")


def _wire_size(payload: bytes, headers: dict[str, str]) -> int:
    """What NATS counts against its max_payload: the header block and the payload."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return len(f"NATS/1.0\r\n{lines}\r\n".encode()) + len(payload)


def test_an_event_over_the_limit_is_cut_into_pieces_under_it_that_join_into_it() -> None:
    payload = bytes(range(256)) * 1000
    assert publications("p-1", "s", payload, 1 << 20) == [
        (payload, {"Nats-Msg-Id": "p-1", "Phi-Session": "s"})
    ]
    for limit in (300, 4096, 65536, 200_000):
        pieces = publications("p-1", "s", payload, limit)
        assert pieces is not None and len(pieces) > 1
        assert all(_wire_size(*piece) <= limit for piece in pieces)
        assert b"".join(piece for piece, _ in pieces) == payload
        total = len(pieces)
        read = [read_piece(headers) for _, headers in pieces]
        assert read == [Piece("p-1", number, total) for number in range(total)]
        assert [headers["Nats-Msg-Id"] for _, headers in pieces] == [f"p-1/{n}/{total}" for n in range(total)]
    # As many pieces under another limit: the same pieces, as their ids say.
    assert publications("p-1", "s", payload, 65536) == publications("p-1", "s", payload, 65000)
    assert publications("p-1", "s", payload, 100) is None  # no room beside a piece's headers


def test_headers_that_say_no_piece_make_none() -> None:
    for headers in (
        {},
        {"Phi-Piece": "0/2"},
        {"Phi-Piece-Of": "p-1"},
        {"Phi-Piece-Of": "p-1", "Phi-Piece": "2/2"},
        {"Phi-Piece-Of": "p-1", "Phi-Piece": "-1/2"},
        {"Phi-Piece-Of": "p-1", "Phi-Piece": "0/x"},
        {"Phi-Piece-Of": "p-1", "Phi-Piece": f"0/{1 << 31}"},  # more than PostgreSQL's integer holds
    ):
        assert read_piece(headers) is None, headers


def test_a_route_in_use_is_kept_and_ended_ones_are_forgotten_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The routing tables forgot their oldest half once full, however recently used: a
    sub-agent still running lost its route, and its later events went to another partition."""
    from phi_session.broker import settings

    monkeypatch.setattr(settings, "_MAX_ROUTES", 3)
    routes = settings.Routes()
    routes.opened("running", "root", "running.c.1")
    routes.opened("running", "root", "running.c.2")  # two loops of one session
    for n in range(10):
        routes.opened(f"done{n}", "root", f"done{n}.c.1")
        routes.ended(f"done{n}", f"done{n}.c.1")
    assert routes.get("running") == "root"
    assert [routes.get(f"done{n}") for n in range(10)] == [None] * 8 + ["root"] * 2  # the latest ended
    routes.ended("running", "running.c.1")
    routes.ended("running", "running.c.0")  # never started: changes nothing
    routes.opened("next", "root", "next.c.1")
    assert routes.get("running") == "root"  # still running its second loop
    routes.ended("running", "running.c.2")
    assert routes.get("running") == "root"  # ended just now: a late sub-agent still finds it
    routes.opened("later", "root", "later.c.1")
    routes.opened("last", "root", "last.c.1")
    known = ["running", "next", "later", "last", *(f"done{n}" for n in range(10))]
    assert [key for key in known if routes.get(key)] == ["next", "later", "last"]


def test_a_loop_of_a_session_its_id_does_not_name_is_tracked_until_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from phi_session.broker import settings

    monkeypatch.setattr(settings, "_MAX_ROUTES", 2)
    usage = ps.Usage(input=0, output=0, total_tokens=0)
    when = ps.Timestamp.from_ns(1_750_000_000 * 10**9)

    def start(session: str, loop_id: str) -> ps.AgentStart:
        return ps.AgentStart(
            agent_id="a", session_id=session, loop_id=loop_id, continuation_kind=ps.INITIAL, timestamp=when
        )

    def turn(loop_id: str) -> ps.TurnStart:
        return ps.TurnStart(loop_id=loop_id, turn_index=0, timestamp=when, triggered_by="User")

    loops = settings.Routes()
    assert settings.track_session(start("a.b", "a.b.c.1"), loops) == "a.b"  # its loop id says "a"
    for n in range(5):
        settings.track_session(start(f"x.{n}", f"x.{n}.c.1"), loops)
        settings.track_session(
            ps.AgentEnd(loop_id=f"x.{n}.c.1", messages=(), usage=usage, timestamp=when), loops
        )
    assert settings.track_session(turn("a.b.c.1"), loops) == "a.b"
    assert settings.track_session(turn("x.4.c.1"), loops) == "x.4"  # ended last: still known
    assert settings.track_session(turn("x.0.c.1"), loops) == "x"  # forgotten


def test_routes_of_loops_that_never_end_are_capped_the_longest_running_forgotten_first(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A route was kept while its loop ran, and a loop whose agent was killed runs for
    ever: 250,000 such loops held 250,000 routes (~98 MB), without limit."""
    from phi_session.broker import settings

    monkeypatch.setattr(settings, "_MAX_ROUTES", 2)
    monkeypatch.setattr(settings, "_MAX_OPEN_ROUTES", 3)
    routes = settings.Routes()
    for n in range(6):
        routes.opened(f"killed{n}", "root", f"killed{n}.c.1")
    assert [routes.get(f"killed{n}") for n in range(6)] == [None] * 3 + ["root"] * 3
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # once, not at every route forgotten
    routes.ended("killed0", "killed0.c.1")  # forgotten already: changes nothing
    assert routes.get("killed5") == "root"


def test_a_loop_ended_before_it_started_does_not_hold_its_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its AgentEnd came first and was ignored: its AgentStart then kept the route as in use
    for ever (250,000 such loops held 250,000 routes)."""
    from phi_session.broker import settings

    monkeypatch.setattr(settings, "_MAX_ROUTES", 2)
    routes = settings.Routes()
    routes.ended("early", "early.c.1")
    routes.opened("early", "root", "early.c.1")
    assert routes.get("early") == "root"  # a late event of it still finds it
    for n in range(3):
        routes.opened(f"done{n}", "root", f"done{n}.c.1")
        routes.ended(f"done{n}", f"done{n}.c.1")
    assert routes.get("early") is None  # forgotten as an ended route is
    routes.opened("early", "root", "early.c.1")  # sent again, in order this time: in use until its end
    for n in range(3):
        routes.opened(f"again{n}", "root", f"again{n}.c.1")
        routes.ended(f"again{n}", f"again{n}.c.1")
    assert routes.get("early") == "root"


def test_released_routes_are_forgotten_as_ended_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from phi_session.broker import settings

    monkeypatch.setattr(settings, "_MAX_ROUTES", 1)
    routes = settings.Routes()
    routes.opened("run-1", "S", "run-1")
    routes.opened("run-2", "S", "run-2")
    routes.opened("run-3", "T", "run-3")
    routes.release({"S"})  # their agent was killed: its loops never end
    routes.opened("run-4", "U", "run-4")
    assert [routes.get(f"run-{n}") for n in range(1, 5)] == [None, None, "T", "U"]


def test_releasing_a_session_releases_the_loops_now_routed_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A release goes by an index of each session's running loops (it scanned every running
    loop at each idle check: 290-470 ms with 500,000 running; measured by its repro, not
    here): a loop started again in another session moves to that session's entry."""
    from phi_session.broker import settings

    monkeypatch.setattr(settings, "_MAX_ROUTES", 1)
    routes = settings.Routes()
    routes.opened("run-1", "S", "run-1")
    routes.opened("run-1", "T", "run-1")  # started again in another session: released with it
    routes.opened("run-2", "S", "run-2")
    routes.release({"S"})
    assert routes.get("run-1") == "T"
    routes.release({"T"})
    routes.opened("run-3", "U", "run-3")
    assert [routes.get(f"run-{n}") for n in range(1, 4)] == [None, None, "U"]
