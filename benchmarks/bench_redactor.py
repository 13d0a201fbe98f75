"""The redactor's cost where it once grew: long histories, and streamed text.

Part 1 (``history``) grows one conversation (each turn: an assistant message with a
~3 KB tool-call argument and some text, and a tool result), sends every turn's
``TurnRequest`` with the whole history through a `Redactor`, and prints the CPU time of
one request (median of 10) once the history weighs 4, 16 and 32 MiB of JSON, with and
without ``redact_text``. Target: a request at 32 MiB costs at most 30x one at 4 MiB
(past the redactor's 8 MiB budget, every request rescanned the whole history: 2,000x).

Part 2 (``deltas``) streams 2,000 text deltas a reply through a `Tracer` (the redactor,
one list sink) and prints the CPU time per delta, without ``redact_text``, with it on
prose, and with it on text dense in what may start a secret (``=``, ``Be``...), where
the redactor holds back the end of the stream. Target: without ``redact_text``, at most
700 ns (the path the agent pays for every token).

Usage: python benchmarks/bench_redactor.py [--part history|deltas]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import phi_session as ps
from phi_session.identity import AgentSession, FakeClock
from phi_session.instrument import Tracer
from phi_session.messages import TextFormat
from phi_session.processors import Redactor

MIB = 1024 * 1024


def _payload(history: tuple[ps.Message, ...]) -> ps.AnnotatedRequestPayload:
    return ps.AnnotatedRequestPayload(
        system_prompt="s",
        messages=history,
        provenance=(),
        tools=(),
        model_id="m",
        thinking_level="off",
        response_format=TextFormat(),
    )


def history(redact_text: bool, sizes: tuple[int, ...] = (4, 16, 32)) -> dict[int, float]:
    """CPU ms of one TurnRequest (median of 10) at each history size in MiB."""
    redactor = Redactor(redact_text=redact_text)
    messages: list[ps.Message] = [ps.UserMessage(content=(ps.TextContent(text="hi"),), timestamp=1)]
    weight = turn = 0

    def request() -> ps.TurnRequest:
        nonlocal weight, turn
        turn += 1
        arguments = {"path": f"src/m{turn}.py", "content": f"x = {turn}\n" * 400}
        call = ps.ToolCall(id=f"c{turn}", name="write", arguments=arguments)
        reply = ps.AssistantMessage(
            content=(ps.TextContent(text="let me write " * 20), call),
            stop_reason="toolUse",
            model="m",
            provider="p",
            usage=ps.Usage(input=1, output=1),
            timestamp=turn,
        )
        result = ps.ToolResultMessage(
            tool_call_id=f"c{turn}",
            tool_name="write",
            content=(ps.TextContent(text="ok " * 300),),
            is_error=False,
            timestamp=turn,
        )
        for message in (reply, result):  # as a Tracer passes them: each ends before it is resent
            redactor(ps.MessageEnd(loop_id="l", message=message))
            weight += len(ps.encode(message))
        messages.extend((reply, result))
        payload = _payload(tuple(messages))
        return ps.TurnRequest(loop_id="l", turn_index=turn, payload=payload, timestamp=ps.Timestamp.now())

    out = {}
    for size in sizes:
        while weight < size * MIB:
            redactor(request())
        times = []
        for _ in range(10):
            event = request()
            start = time.thread_time()
            redactor(event)
            times.append(time.thread_time() - start)
        out[size] = statistics.median(times) * 1000
    return out


def deltas(redact_text: bool, pieces: list[str], runs: int = 5) -> float:
    """CPU ns per text delta through a Tracer (best of `runs`)."""
    best = float("inf")
    for _ in range(runs):
        sink: list[ps.AgentEvent] = []
        tracer = Tracer(
            AgentSession(clock=FakeClock()),
            sinks=[sink.append],
            redact=Redactor(redact_text=redact_text),
            config=ps.LoopConfigSnapshot(model="m", provider="p"),
        )
        with tracer.loop() as loop, loop.turn() as turn:
            start = time.thread_time_ns()
            for _ in range(5):
                with turn.assistant() as reply:
                    for piece in pieces:
                        reply.text_delta(piece)
                    reply.finish()
            best = min(best, (time.thread_time_ns() - start) / (5 * len(pieces)))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["history", "deltas"])
    part = parser.parse_args().part
    if part in (None, "history"):
        for redact_text in (False, True):
            ms = history(redact_text)
            figures = ", ".join(f"{size} MiB {value:.3f} ms" for size, value in ms.items())
            ratio = ms[32] / ms[4]
            verdict = "PASS" if ratio <= 30 else "MISS"
            print(
                f"TurnRequest, redact_text={redact_text}: {figures}; 32/4 MiB {ratio:.1f}x (<= 30x) {verdict}"
            )
    if part in (None, "deltas"):
        rng = random.Random(0)
        words = [
            f" {w}"
            for w in "the of and to in is you that it was for on are as with they at be this maybe".split()
        ]
        prose = [rng.choice(words) for _ in range(2000)]
        dense = [rng.choice([*words, " x = 1", " a=b", " A", " e:", " Be"]) for _ in range(2000)]
        plain = deltas(False, prose)
        print(f"delta without redact_text: {plain:.0f} ns (<= 700 ns) {'PASS' if plain <= 700 else 'MISS'}")
        print(f"delta with redact_text, prose: {deltas(True, prose):.0f} ns")
        print(f"delta with redact_text, text dense in anchors: {deltas(True, dense):.0f} ns")


if __name__ == "__main__":
    main()
