"""Viewer benchmark: how fast a huge session opens in the web viewer (issue 14, item 6).

Usage: ``python benchmarks/bench_viewer.py [--loops N] [--store sqlite|json]``

One session of ``--loops`` (10,000) loops is built from the W1 workload's first
session (`workload.events`, recorded: each loop keeps 44 events and 4 turns), the
loops chained as continuations: 10,000 loops hold 440,000 events; ``--loops
23000`` gives a session of over 1,000,000 events. It is saved
into a fresh store, then a viewer serves it and the script times, over HTTP,
what the page asks for when it opens the session:

* ``overview`` the first request (the store loads the session's outline,
  `SessionStore.load_outline`: every loop without messages, turns and events),
  unpriced as the page asks for it (pricing 23,000 loops takes about 0.1 s; the page fills
  the cost in after it shows, from ``/cost``; ``overview priced`` times it),
* ``loops page`` the first 200 loops in tree order,
* ``loop`` one loop's turns (what opening a loop fetches: `load_loops` of one),
* ``event-log page`` the first 200 events, then 200 events of one type (only the
  loops the page covers are read),
* ``timeline page`` the waterfall of the first 20 loops (what the page draws first;
  scrolling asks for the next 20), then of 20 loops near the end, each loop and turn
  priced (only those loops are read),
* ``cost page`` the cost of 200 loops and their turns,
* and the same requests again, warm (the outline is cached by the viewer),
* then the session's cost with each loop moved a second after the one before (no two
  model calls at one instant, as in real sessions): `Pricer.outline`, cold and with
  the table's rates known, against the table's own ``calc_price`` on a sample.

"Opens" is overview + loops page: the page shows then. "Filled" adds what the page
asks for after it shows: the first timeline page and the priced overview (the
session's cost). The old page's request (the whole session's JSON) is timed too, for
comparison with ``--whole``. Nothing is asserted: the script prints figures and exits 0.

Measured (2 shared cores, other jobs running: load average 4-10, so cold figures
vary by 2x from run to run; SQLite; issue 14). 10,000 loops (440,000 events):
before outlines the overview alone took 18.7 s cold (the viewer loaded the whole
session) and the page waited ~25 s. 23,000 loops (1,012,000 events), cold: with
each loop's outline decoded whole (its bare record included) the page opened in
2.3 s (overview 1.9 s + loops page 0.34 s); with flat outlines whose record stays
JSON until a page shows it, in a median of 0.59 s over 5 fresh viewers (0.47-1.08
s), and since loop rows hold their messages apart (`message_book`: smaller rows to
read past) in medians of 0.23 and 0.48 s in two runs (0.17-0.78 s); 10,000 loops
0.16 s; 10-30 ms warm. The timeline's first page (20 loops, priced) took 36.6-40.3
s cold when it loaded the whole session; now 0.4-0.5 s cold (the first pricing
included), 14-40 ms warm; a cost page of 200 loops 0.2-0.3 s; event-log pages
10-80 ms. The cost of the 92,000 model calls at distinct timestamps: 0.09-0.11 s
(about 1 us a call; ``calc_price`` about 100 us a call, 9 s); before, when a loop was
priced as one call and the price looked up per distinct timestamp, 2.6-2.9 s.
``--store json`` (1,000 loops, a 108 MB file; load average 10+): every page after the
overview decoded the whole file again, 1.7-3.8 s each (one loop's turns 1.7 s cold, 3.1 s
warm); now the store keeps the file split by loop while it is unchanged: one loop 1 ms,
event-log pages 5-220 ms, the first timeline page 140-180 ms, a cost page of 200 loops
0.5-0.8 s (decoding and pricing those loops), a fresh viewer's open 48 ms instead of 2.8 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec

from phi_session import Session
from phi_session.cost import Pricer, prices_available
from phi_session.model import LoopRecord
from phi_session.recorder import SessionRecorder
from phi_session.stores.base import SessionStore
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore
from phi_session.web.server import make_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # lives beside this script


def huge_session(loops: int, session_id: str = "huge-session") -> Session:
    """A session of `loops` loops, each a copy of a recorded W1 loop continuing the one before."""
    recorder = SessionRecorder()
    recorder.record_all(workload.events(1))
    recorder.flush()
    template = recorder.drain_completed()[0]
    base = template.loops[1]  # a continuation: Default kind, parent set
    records: list[LoopRecord] = []
    for index in range(loops):
        loop_id = f"{session_id}.loop.{index}"
        source = template.loops[0] if index == 0 else base
        records.append(
            msgspec.structs.replace(
                source,
                loop_id=loop_id,
                session_id=session_id,
                parent_loop_id=None if index == 0 else records[-1].loop_id,
                children_loop_ids=(),
                child_loop_refs=(),
                events=source.events,  # the events keep the template's loop id: the viewer does not mind
            )
        )
        if index:
            records[-2].children_loop_ids = (loop_id,)
    return msgspec.structs.replace(template, session_id=session_id, loops=records)


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def fetch(url: str) -> int:
    with urllib.request.urlopen(url) as response:
        return len(response.read())


def time_pricing(store: SessionStore, sample: int = 3000) -> None:
    """The session's cost (`Pricer.outline`: every model call at its own price) with each
    loop moved one second after the one before, so that no two calls share a timestamp
    (real sessions'), against the table's own ``calc_price`` on a sample of the calls."""
    if not prices_available():
        print("-- pricing: skipped (needs the prices extra, genai-prices)")
        return
    import genai_prices

    outline = store.load_outline("huge-session")
    loops = tuple(
        msgspec.structs.replace(
            loop,
            calls=tuple(
                msgspec.structs.replace(call, started_ms=call.started_ms + 1000 * index)
                for call in loop.model_calls()
            ),
        )
        for index, loop in enumerate(outline.loops)
    )
    spread = msgspec.structs.replace(outline, loops=loops)
    calls = [(loop, call) for loop in loops for call in loop.model_calls()]
    print(f"-- the session's cost: {len(calls):,} model calls at distinct timestamps")
    pricer = Pricer()
    for label in ("Pricer.outline, cold", "Pricer.outline, warm"):  # warm: the table's rates known
        copy = msgspec.structs.replace(spread)  # a new outline: its cost is not remembered
        seconds = timed(lambda copy=copy: pricer.outline(copy))
        print(f"  {label:32} {seconds * 1000:9.1f} ms  {seconds / len(calls) * 1e6:6.1f} us a call")

    def table() -> None:
        for loop, call in calls[:sample]:
            usage = genai_prices.Usage(
                input_tokens=call.input + call.cache_read + call.cache_write,
                cache_read_tokens=call.cache_read,
                cache_write_tokens=call.cache_write,
                output_tokens=call.output,
                output_reasoning_tokens=min(call.reasoning, call.output),
            )
            genai_prices.calc_price(
                usage,
                loop.model or "",
                provider_id=loop.provider,
                genai_request_timestamp=call.started_at.to_datetime(),
            )

    seconds = timed(table) / min(sample, len(calls)) * len(calls)
    label = "calc_price a call (extrapolated)"
    print(f"  {label:32} {seconds * 1000:9.1f} ms  {seconds / len(calls) * 1e6:6.1f} us a call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=10_000)
    parser.add_argument("--store", choices=("sqlite", "json"), default="sqlite")
    parser.add_argument("--whole", action="store_true", help="also time the whole session's JSON (slow, big)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="cold opens timed again, each by a fresh viewer (default 5)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        session = huge_session(args.loops)
        events = sum(len(record.events) for record in session.loops)
        built = time.perf_counter() - started
        print(f"session: {args.loops:,} loops, {events:,} events (built in {built:.1f} s)")
        store: SessionStore = (
            SqliteStore(Path(root) / "s.db") if args.store == "sqlite" else JsonDirStore(root)
        )
        saving = timed(lambda: store.save(session))
        print(f"save into {args.store}: {saving:.2f} s")
        server = make_server(store, quiet=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        api = f"{server.url}api/sessions/huge-session"
        steps = [
            ("overview (unpriced)", f"{api}/overview?cost=0"),
            ("loops page (200)", f"{api}/loops?limit=200"),
            ("loop (one loop's turns)", f"{api}/loops/{args.loops // 2}"),
            ("event-log page (200)", f"{api}/event-log?limit=200"),
            ("event-log page, type TurnEnd", f"{api}/event-log?limit=200&type=TurnEnd"),
            ("event-log page, far in", f"{api}/event-log?limit=200&offset={events - 1000}"),
            ("loops page near the end", f"{api}/loops?limit=200&offset={max(0, args.loops - 1000)}"),
            ("timeline page (20 loops)", f"{api}/timeline?limit=20"),
            ("timeline page near the end", f"{api}/timeline?limit=20&offset={max(0, args.loops - 40)}"),
            ("cost page (200 loops)", f"{api}/cost?limit=200"),
            ("overview priced", f"{api}/overview"),
        ]
        filling = {"timeline page (20 loops)", "overview priced"}
        for label in ("cold", "warm"):
            total_open = total_filled = 0.0
            print(f"-- {label}")
            for index, (name, url) in enumerate(steps):
                size = 0

                def get(url: str = url) -> None:
                    nonlocal size
                    size = fetch(url)

                seconds = timed(get)
                if index < 2:
                    total_open += seconds
                if index < 2 or name in filling:
                    total_filled += seconds
                print(f"  {name:32} {seconds * 1000:9.1f} ms  {size / 1e3:9.1f} kB")
            print(f"  {'opens (overview+loops page)':32} {total_open * 1000:9.1f} ms")
            print(f"  {'filled (+timeline, cost)':32} {total_filled * 1000:9.1f} ms")
        # The machine is shared and noisy: the cold open again, each time by a new viewer
        # (an empty cache: the outline is read and decoded again).
        opens = []
        for _ in range(args.repeat):
            fresh = make_server(store, quiet=True)
            threading.Thread(target=fresh.serve_forever, daemon=True).start()
            fresh_api = f"{fresh.url}api/sessions/huge-session"
            started = time.perf_counter()
            fetch(f"{fresh_api}/overview?cost=0")
            fetch(f"{fresh_api}/loops?limit=200")
            opens.append(time.perf_counter() - started)
            fresh.shutdown()
        if opens:
            median = statistics.median(opens) * 1000
            figures = ", ".join(f"{seconds * 1000:.0f}" for seconds in opens)
            print(f"-- cold opens by {len(opens)} fresh viewers: median {median:.0f} ms ({figures})")
        if args.whole:
            print("-- the whole session at once (what the page fetched before paging)")
            size = 0

            def whole() -> None:
                nonlocal size
                size = fetch(api)

            print(f"  {'session JSON':32} {timed(whole) * 1000:9.1f} ms  {size / 1e6:9.1f} MB")
        time_pricing(store)
        server.shutdown()
        store.close()


if __name__ == "__main__":
    main()
