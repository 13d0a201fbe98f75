"""Cost of stored usage: genai-prices for known models, user prices, unknown models."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phi_session._time import Timestamp
from phi_session.cost import (
    USER_SOURCE,
    ZERO_COST,
    Cost,
    CostTotal,
    InvalidPrices,
    Pricer,
    cost_totals,
    prices_available,
)
from phi_session.errors import InvalidQuery
from phi_session.events import MessageEnd, TurnStart
from phi_session.messages import ZERO_USAGE, Usage
from phi_session.model import LoopEvent, ModelCall, Session
from phi_session.stores.base import SessionStore, UsageRow, UsageTotal
from phi_session.stores.conformance import TIERED_CALL, at, calls_loop, make_loop, make_session
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.outline import session_outline

from .store_support import OPUS_THEN_MINI, replies_session

needs_table = pytest.mark.skipif(not prices_available(), reason="needs the prices extra (genai-prices)")
WHEN = Timestamp.parse("2025-06-01T12:00:00Z")
USAGE = Usage(input=1000, output=500, reasoning=200, cache_read=3000, cache_write=100, total_tokens=4600)


@needs_table
@pytest.mark.parametrize(
    ("provider", "model"),
    [
        ("anthropic", "claude-sonnet-4-5"),
        ("openai", "gpt-4o"),
        ("anthropic", "claude-haiku-4-5"),
    ],
)
def test_known_models_cost_what_genai_prices_says(provider: str, model: str) -> None:
    import genai_prices

    expected = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=4100,
            cache_read_tokens=3000,
            cache_write_tokens=100,
            output_tokens=500,
            output_reasoning_tokens=200,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=datetime(2025, 6, 1, 12, tzinfo=timezone.utc),
    )
    cost = Pricer().price(USAGE, provider, model, WHEN)
    table = f"genai-prices {genai_prices.__version__}"
    assert cost == Cost(usd=float(expected.total_price), sources=(table,))
    assert cost.usd is not None and cost.usd > 0


@needs_table
def test_cache_reads_are_cheaper_than_fresh_input() -> None:
    pricer = Pricer()
    fresh = pricer.price(Usage(input=10_000, output=0), "anthropic", "claude-sonnet-4-5", WHEN)
    cached = pricer.price(Usage(input=0, output=0, cache_read=10_000), "anthropic", "claude-sonnet-4-5", WHEN)
    assert fresh.usd is not None and cached.usd is not None and cached.usd < fresh.usd


def test_cache_inside_input_is_billed_once() -> None:
    # phi-core's OpenAI-compatible and Gemini providers write input = the prompt, cache
    # included, and the provider's total (prompt + completion); its Anthropic provider and
    # phi-session's adapters write the uncached input (total 0, or counting the cache on top).
    pricer = Pricer({"gpt-4o": {"input": 2, "output": 8, "cache_read": 1}})
    openai = Usage(input=10_000, output=500, cache_read=8_000, total_tokens=10_500)
    gemini = Usage(input=10_000, output=500, cache_read=8_000, total_tokens=10_900)  # + 400 thoughts
    apart = Usage(input=2_000, output=500, cache_read=8_000, total_tokens=10_500)
    anthropic = Usage(input=2_000, output=500, cache_read=8_000)
    expected = Cost(usd=(2_000 * 2 + 500 * 8 + 8_000 * 1) / 1e6, sources=(USER_SOURCE,))
    for usage in (openai, gemini, apart, anthropic):
        assert pricer.price(usage, "openai", "gpt-4o", WHEN) == expected, usage


@needs_table
def test_openai_cached_tokens_cost_what_genai_prices_says() -> None:
    import genai_prices

    recorded = Usage(input=10_000, output=500, cache_read=8_000, total_tokens=10_500)
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=10_000, cache_read_tokens=8_000, output_tokens=500),
        "gpt-4o",
        provider_id="openai",
        genai_request_timestamp=datetime(2025, 6, 1, 12, tzinfo=timezone.utc),
    )
    cost = Pricer().price(recorded, "openai", "gpt-4o", WHEN)
    assert cost.usd == pytest.approx(float(expected.total_price), rel=1e-9)


@needs_table
def test_an_unknown_provider_name_falls_back_to_the_model() -> None:
    pricer = Pricer()
    assert pricer.price(USAGE, "my-gateway", "gpt-4o", WHEN) == pricer.price(USAGE, "openai", "gpt-4o", WHEN)


@needs_table
@pytest.mark.parametrize(("provider", "model"), [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5")])
def test_a_model_named_with_its_provider_first_is_priced_as_the_model(provider: str, model: str) -> None:
    # Google ADK recorded LiteLLM's ids so (provider 'openai', model 'openai/gpt-4o'): unknown.
    call = [ModelCall.of(WHEN, USAGE)]
    assert Pricer().calls(call, provider, f"{provider}/{model}") == Pricer().calls(call, provider, model)
    assert Pricer().calls(call, provider, model).known


def test_a_users_price_applies_to_a_model_named_with_its_provider_first() -> None:
    pricer = Pricer({"gpt-4o": {"input": 1, "output": 1}}, use_table=False)
    assert pricer.price(USAGE, "openai", "openai/gpt-4o", WHEN) == pricer.price(
        USAGE, "openai", "gpt-4o", WHEN
    )


def test_unknown_model_is_unknown_never_zero() -> None:
    cost = Pricer().price(USAGE, "acme", "secret-model-9", WHEN)
    assert cost == Cost(usd=None, unpriced=("acme/secret-model-9",))
    assert not cost.known
    assert (cost + Cost(usd=1.0, sources=(USER_SOURCE,))).usd is None  # a sum with an unknown part is unknown


def test_no_tokens_cost_nothing_whatever_the_model() -> None:
    assert Pricer().price(Usage(input=0, output=0), "acme", "secret-model-9", WHEN) == ZERO_COST


def test_tokens_reported_only_as_a_total_are_unknown_never_zero() -> None:
    # A framework that counted only a total (usage_of(None, None, total=...)): which kind of
    # token they were, and so their price, is unknown, even for a model with a price.
    total_only = Usage(input=0, output=0, total_tokens=1_000)
    pricer = Pricer({"openai/gpt-4o": {"input": 2, "output": 8}})
    # Unpriced for want of split tokens, not of a price: `unsplit` says which.
    unknown = Cost(usd=None, unpriced=("openai/gpt-4o",), unsplit=("openai/gpt-4o",))
    assert pricer.price(total_only, "openai", "gpt-4o", WHEN) == unknown
    assert unknown + Cost(usd=None, unpriced=("acme/x",)) == Cost(
        usd=None, unpriced=("acme/x", "openai/gpt-4o"), unsplit=("openai/gpt-4o",)
    )
    split = pricer.price(Usage(input=1_000, output=0, total_tokens=1_000), "openai", "gpt-4o", WHEN)
    assert split == Cost(usd=0.002, sources=(USER_SOURCE,))


def test_user_prices_win_and_name_their_source() -> None:
    pricer = Pricer(
        {
            "openai/gpt-4o": {"input": 2, "output": 8, "cache_read": 1},
            "secret-model-9": {"input": 1, "output": 1},
        }
    )
    cost = pricer.price(USAGE, "openai", "gpt-4o", WHEN)
    # (1000 * 2 + 500 * 8 + 3000 * 1 + 100 * 2 [cache writes at the input rate]) / 1e6
    assert cost == Cost(usd=float(Decimal(9200) / 1_000_000), sources=(USER_SOURCE,))
    assert pricer.price(USAGE, "any", "secret-model-9", WHEN).usd == pytest.approx(0.0046)


def test_user_prices_work_without_the_table() -> None:
    pricer = Pricer({"acme/m": {"input": 1, "output": 1}}, use_table=False)
    assert pricer.table_source is None and "phi-session[prices]" in (pricer.hint or "")
    assert pricer.price(Usage(input=10, output=0), "acme", "m", WHEN).sources == (USER_SOURCE,)
    assert pricer.price(Usage(input=10, output=0), "openai", "gpt-4o", WHEN).usd is None


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_user_price_files(tmp_path: Path, suffix: str) -> None:
    text = (
        '{"acme/m": {"input": 1.5, "output": 3}}'
        if suffix == ".json"
        else '["acme/m"]\ninput = 1.5\noutput = 3\n'
    )
    path = tmp_path / f"prices{suffix}"
    path.write_text(text)
    cost = Pricer.from_file(path, use_table=False).price(Usage(input=1_000_000, output=0), "acme", "m", WHEN)
    assert cost.usd == 1.5


@pytest.mark.parametrize(
    ("prices", "fragment"),
    [
        ({"m": {"input": 1}}, "price of 'm'"),
        ({"m": {"input": -1, "output": 1}}, "input must be a finite non-negative number"),
        # An infinite price (TOML's inf, JSON's 1e400) made every cost of the model crash.
        ({"m": {"input": 1, "output": float("inf")}}, "output must be a finite non-negative number"),
        ({"m": {"input": 1, "output": 1, "colour": 1}}, "colour"),
        ({"": {"input": 1, "output": 1}}, "non-empty"),
    ],
)
def test_bad_user_prices_are_refused(prices: dict, fragment: str) -> None:
    with pytest.raises(InvalidPrices, match=fragment):
        Pricer(prices)


def test_arguments_of_another_type_are_type_errors() -> None:
    """They raised AttributeError ('int' object has no attribute 'items' / 'loops')."""
    pricer = Pricer(use_table=False)
    for call, message in (
        (lambda: Pricer(5), "^user_prices must be Mapping or None, not int$"),  # type: ignore[arg-type]
        (lambda: pricer.session(5), "^session must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: pricer.breakdown(5), "^session must be Session, not int$"),  # type: ignore[arg-type]
        (lambda: pricer.outline(5), "^outline must be SessionOutline, not int$"),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError, match=message):
            call()


def test_unreadable_price_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidPrices) as missing:
        Pricer.from_file(tmp_path / "missing.json")
    # The file named once, then why (not the OS's repeat of the name).
    assert (
        str(missing.value)
        == f"cannot read prices from {tmp_path / 'missing.json'}: No such file or directory"
    )
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InvalidPrices, match="expected a table"):
        Pricer.from_file(tmp_path / "list.json")
    # A bad price in a file names the file, as its other errors do.
    (tmp_path / "bad.json").write_text('{"gpt-4o": {"input": -1, "output": 1}}')
    with pytest.raises(InvalidPrices) as bad:
        Pricer.from_file(tmp_path / "bad.json")
    assert str(bad.value) == (
        f"{tmp_path / 'bad.json'}: price of 'gpt-4o': input must be a finite non-negative number, got -1.0"
    )


def test_breakdown_and_totals() -> None:
    pricer = Pricer({"openai/gpt-4o": {"input": 1, "output": 1}}, use_table=False)
    session = make_session(
        "s",
        loops=[
            make_loop("s", 1, tokens=1_000_000),
            make_loop("s", 2, tokens=1000, model="acme/unknown", started_at=at(5)),
        ],
    )
    breakdown = pricer.breakdown(session)
    assert [loop.cost.usd for loop in breakdown.loops] == [1.0, None]
    assert breakdown.cost == Cost(usd=None, sources=(USER_SOURCE,), unpriced=("acme/unknown",))
    assert cost_totals([session], "model", pricer) == [
        CostTotal(key="acme/unknown", cost=Cost(usd=None, unpriced=("acme/unknown",))),
        CostTotal(key="openai/gpt-4o", cost=Cost(usd=1.0, sources=(USER_SOURCE,))),
    ]
    assert [row.key for row in cost_totals([session], "day", pricer)] == ["2024-05-01"]
    assert [row.key for row in cost_totals([session], "session", pricer)] == ["s"]
    assert cost_totals([session], "DAY", pricer) == cost_totals([session], "day", pricer)
    assert cost_totals([session], "Session", pricer) == cost_totals([session], "session", pricer)
    with pytest.raises(
        InvalidQuery, match="group_by: expected one of agent, model, day, session; got 'week'"
    ):
        cost_totals([session], "week", pricer)


def test_import_phi_session_imports_no_genai_prices() -> None:
    code = "import sys, phi_session, phi_session.cost; print([m for m in sys.modules if 'genai' in m])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_without_the_extra_cost_is_unknown_with_a_hint() -> None:
    code = (
        "import sys; sys.modules['genai_prices'] = None\n"
        "from phi_session.cost import Pricer\nfrom phi_session.messages import Usage\n"
        "from phi_session._time import Timestamp\n"
        "p = Pricer()\n"
        "print(p.price(Usage(input=5, output=5), 'openai', 'gpt-4o', Timestamp.now()).usd, p.hint)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("None ") and "pip install 'phi-session[prices]'" in out


# -- per model call: tiered prices, time windows ---------------------------------------------


def table_usd(usage: Usage, provider: str, model: str, when: Timestamp) -> float:
    """What ``genai-prices`` itself charges for one call (the reference the pricer must match)."""
    import genai_prices

    counts = genai_prices.Usage(
        input_tokens=usage.input + usage.cache_read + usage.cache_write,
        cache_read_tokens=usage.cache_read,
        cache_write_tokens=usage.cache_write,
        output_tokens=usage.output,
        output_reasoning_tokens=min(usage.reasoning, usage.output),
    )
    result = genai_prices.calc_price(
        counts, model, provider_id=provider, genai_request_timestamp=when.to_datetime()
    )
    return float(result.total_price)


@needs_table
def test_a_loop_is_priced_call_by_call_at_tiered_prices(tmp_path: Path) -> None:
    # gemini-2.5-pro charges more per token above 200k input tokens of one request: two
    # calls of 150k cost twice one call, not one call of 300k.
    pricer = Pricer()
    one = table_usd(TIERED_CALL, "google", "gemini-2.5-pro", at(1))
    as_one_call = table_usd(TIERED_CALL + TIERED_CALL, "google", "gemini-2.5-pro", at(1))
    assert as_one_call > 2 * one * 1.5
    session = make_session("s", loops=[calls_loop("s", 1, [TIERED_CALL, TIERED_CALL])])
    [record] = session.loops
    assert pricer.loop(record).usd == pytest.approx(2 * one)
    assert pricer.session(session).usd == pytest.approx(2 * one)
    assert pricer.outline(session_outline(session)).usd == pytest.approx(2 * one)
    breakdown = pricer.breakdown(session)
    assert breakdown.cost.usd == pytest.approx(2 * one)
    assert [turn.cost.usd for turn in breakdown.loops[0].turns] == [pytest.approx(one)] * 2
    assert cost_totals([session], "model", pricer)[0].cost.usd == pytest.approx(2 * one)
    with JsonDirStore(tmp_path) as store:
        store.save(session)
        [row] = store.usage_totals("model", pricer=pricer)
    assert isinstance(row.cost, Cost) and row.cost.usd == pytest.approx(2 * one)


@needs_table
def test_a_cut_off_loop_prices_each_reply_of_its_unfinished_turn() -> None:
    record = calls_loop("s", 1, [TIERED_CALL])
    record.status, record.ended_at, record.usage = "Aborted", None, ZERO_USAGE  # as flush leaves it
    reply = record.turns[0].output_message
    record.events = [
        LoopEvent(
            sequence=0,
            event=TurnStart(
                loop_id=record.loop_id, turn_index=1, timestamp=at(9), triggered_by="Continuation"
            ),
        ),
        LoopEvent(sequence=1, event=MessageEnd(loop_id=record.loop_id, message=reply)),
        LoopEvent(sequence=2, event=MessageEnd(loop_id=record.loop_id, message=reply)),
    ]
    calls = record.model_calls()
    assert [call.usage for call in calls] == [TIERED_CALL] * 3
    assert [call.started_ms for call in calls[1:]] == [at(9).ns // 1_000_000] * 2
    one = table_usd(TIERED_CALL, "google", "gemini-2.5-pro", at(1))
    assert Pricer().loop(record).usd == pytest.approx(3 * one)


def test_a_loop_usage_its_turns_do_not_account_for_is_one_more_call() -> None:
    record = calls_loop("s", 1, [Usage(input=10, output=5, total_tokens=15)])
    record.usage = Usage(input=30, output=5, total_tokens=35)  # a reply whose turn never ended
    assert [call.usage for call in record.model_calls()] == [
        Usage(input=10, output=5, total_tokens=15),
        Usage(input=20, output=0, total_tokens=20),
    ]
    record.usage = Usage(input=5, output=5, total_tokens=10)  # less than its turns: not split
    assert [call.usage for call in record.model_calls()] == [record.usage]


def test_a_saturated_loop_usage_keeps_its_turns_as_calls() -> None:
    # Two turns of 2**63 input tokens: the loop's usage saturates at 2**64 - 1, less than
    # their sum; priced as one call of the config's model it cost $46.1e12 for $24.4e12.
    half = 2**63
    calls = [Usage(input=half, output=0, total_tokens=half)] * 2
    record = calls_loop(
        "s", 1, calls, model="openai/gpt-4o", served_by=["openai/gpt-4o", "openai/gpt-4o-mini"]
    )
    record.usage = Usage(input=2**64 - 1, output=0, total_tokens=2**64 - 1)  # as the tracer saturates it
    assert [(call.input, call.served_by) for call in record.model_calls()] == [
        (half, None),
        (half, ("openai", "gpt-4o-mini")),
    ]
    pricer = Pricer(
        {"openai/gpt-4o": {"input": 2.5, "output": 10}, "openai/gpt-4o-mini": {"input": 0.15, "output": 0.6}},
        use_table=False,
    )
    assert pricer.loop(record).usd == pytest.approx(
        sum(pricer.turn(turn, record).usd for turn in record.turns)
    )
    # Less than its turns for another reason than saturation: still one call.
    record.usage = Usage(input=half, output=0, total_tokens=half)
    assert [call.input for call in record.model_calls()] == [half]


def test_user_prices_and_unknown_models_per_call(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('["google/gemini-2.5-pro"]\ninput = 1\noutput = 10\n')
    pricer = Pricer.from_file(path, use_table=False)
    session = make_session("s", loops=[calls_loop("s", 1, [TIERED_CALL, TIERED_CALL])])
    assert pricer.session(session) == Cost(usd=pytest.approx(2 * (0.15 + 0.01)), sources=(USER_SOURCE,))
    unknown = make_session("u", loops=[calls_loop("u", 1, [TIERED_CALL, TIERED_CALL], model="acme/secret")])
    assert pricer.session(unknown) == Cost(usd=None, unpriced=("acme/secret",))
    assert Pricer().session(unknown) == Cost(usd=None, unpriced=("acme/secret",))


@needs_table
@pytest.mark.parametrize(
    ("provider", "model", "before", "after"),
    [
        # o3's price fell on 2025-06-10 (a start date: UTC days)
        ("openai", "o3", "2025-06-09T23:59:59.999Z", "2025-06-10T00:00:00Z"),
        # deepseek-chat's standard hours end at 16:30 UTC: off-peak after (a time-of-day window)
        ("deepseek", "deepseek-chat", "2025-03-01T16:29:59.999Z", "2025-03-01T16:30:00Z"),
        ("deepseek", "deepseek-chat", "2025-03-01T00:29:59.999Z", "2025-03-01T00:30:00Z"),
        # claude-sonnet-4-6 loses its long-context tier on 2026-03-13
        ("anthropic", "claude-sonnet-4-6", "2026-03-12T23:59:59.999Z", "2026-03-13T00:00:00Z"),
    ],
)
def test_remembered_prices_follow_start_dates_and_time_windows(
    provider: str, model: str, before: str, after: str
) -> None:
    pricer = Pricer()  # one pricer: what it remembers of one call must not price the next
    usage = Usage(input=240_000, output=20_000, cache_read=5_000, total_tokens=265_000)
    costs = []
    for text in (before, after, before, after):
        when = Timestamp.parse(text)
        cost = pricer.price(usage, provider, model, when).usd
        assert cost == pytest.approx(table_usd(usage, provider, model, when), rel=1e-12), text
        costs.append(cost)
    assert costs[0] != costs[1]


counts = st.integers(min_value=0, max_value=3_000_000)
SHARED_PRICER = Pricer()  # shared by the examples: its remembered rates are what is tested


@needs_table
@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(
        [
            ("google", "gemini-2.5-pro"),
            ("anthropic", "claude-sonnet-4-5"),
            ("openai", "gpt-4o"),
            ("deepseek", "deepseek-v4-pro"),
            ("openai", "gpt-5.6-sol"),
        ]
    ),
    counts,
    counts,
    counts,
    counts,
    counts,
    st.integers(min_value=1_700_000_000_000, max_value=1_830_000_000_000),
)
def test_the_pricer_charges_what_the_table_does(
    model: tuple[str, str], fresh: int, read: int, write: int, output: int, reasoning: int, millis: int
) -> None:
    usage = Usage(input=fresh, output=output, reasoning=reasoning, cache_read=read, cache_write=write)
    when = Timestamp.from_ns(millis * 1_000_000)
    expected = table_usd(usage, *model, when) if fresh or read or write or output else 0.0
    assert SHARED_PRICER.price(usage, *model, when).usd == pytest.approx(expected, rel=1e-12, abs=1e-15)


@needs_table
def test_an_updated_table_is_used_at_once() -> None:
    # genai-prices' UpdatePrices replaces the table's data: what the pricer remembered of the
    # old data (models, rates, outlines' costs) is not used any more.
    from genai_prices import data_snapshot

    pricer = Pricer()
    session = make_session("s", loops=[calls_loop("s", 1, [TIERED_CALL])])
    outline = session_outline(session)
    known = pricer.outline(outline)
    assert known.known and pricer.outline(outline) is known  # remembered
    data_snapshot.set_custom_snapshot(data_snapshot.DataSnapshot(providers=[], from_auto_update=True))
    try:
        assert pricer.outline(outline) == Cost(usd=None, unpriced=("google/gemini-2.5-pro",))
        assert pricer.session(session) == Cost(usd=None, unpriced=("google/gemini-2.5-pro",))
    finally:
        data_snapshot.set_custom_snapshot(None)
    assert pricer.outline(outline) == known


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from([("p", "m1"), ("p", "m2"), ("q", "unknown-model")]),
            st.integers(1, 10**7),
            st.integers(0, 10**6),
        ),
        min_size=1,
        max_size=30,
    ),
    st.randoms(use_true_random=False),
)
def test_totals_do_not_depend_on_the_order_a_store_reads_its_rows(rows: list, random: Any) -> None:
    # Each store reads its loops in an order of its own: the same loops must cost the same,
    # to the last bit, and name their sources and unpriced models alike.
    pricer = Pricer({"p/m1": {"input": 0.1, "output": 0.3}, "p/m2": {"input": 1.1, "output": 2.7}})
    usage_rows = [
        UsageRow(
            key, provider, model, Usage(input=i, output=o), [ModelCall.of(WHEN, Usage(input=i, output=o))]
        )
        for key, (provider, model), i, o in rows
    ]
    shuffled = list(usage_rows)
    random.shuffle(shuffled)
    assert pricer.row_costs(shuffled) == pricer.row_costs(usage_rows)


def test_a_turn_a_replay_served_from_its_recording_costs_nothing() -> None:
    """The loop cost nothing, but each of its turns was priced at its recorded usage (the
    viewer's turn tooltips and the cost API's per-turn rows)."""
    from phi_session import (
        AgentEnd,
        AgentStart,
        AssistantMessage,
        LoopConfigSnapshot,
        SessionRecorder,
        TurnEnd,
    )
    from phi_session.messages import TextContent
    from phi_session.model import mark_replayed

    usage = Usage(input=1000, output=10, total_tokens=1010)
    reply = mark_replayed(
        AssistantMessage(
            content=(TextContent(text="a"),),
            stop_reason="stop",
            model="m",
            provider="p",
            usage=usage,
            timestamp=1,
        )
    )
    recorder = SessionRecorder()
    recorder.record_all(
        [
            AgentStart(
                agent_id="a",
                session_id="s",
                loop_id="s.c.1",
                timestamp=WHEN,
                config_snapshot=LoopConfigSnapshot(model="m", provider="p"),
            ),
            TurnStart(loop_id="s.c.1", turn_index=0, triggered_by="User", timestamp=WHEN),
            TurnEnd(loop_id="s.c.1", message=reply, usage=usage, timestamp=WHEN, tool_results=()),
            AgentEnd(loop_id="s.c.1", messages=(reply,), usage=usage, timestamp=WHEN),
        ]
    )
    recorder.flush()
    [record] = recorder.drain_completed()[0].loops
    pricer = Pricer({"p/m": {"input": 1, "output": 1}}, use_table=False)
    assert pricer.loop(record).usd == 0
    assert pricer.turn(record.turns[0], record).usd == 0


def _served_session(
    configured: tuple[str, str] = ("anthropic", "claude-opus-4-1"),
    served: tuple[str, str] = ("openai", "gpt-4o-mini"),
) -> Any:
    """A loop configured for `configured` (provider, model) whose one reply `served`
    served (by default a fallback)."""
    from phi_session import AgentSession, LoopConfigSnapshot, SessionRecorder, Tracer

    recorder = SessionRecorder()
    config = LoopConfigSnapshot(model=configured[1], provider=configured[0])
    tracer = Tracer(AgentSession(), sinks=[recorder], config=config)
    with tracer.loop() as loop:
        loop.user("hi")
        with loop.turn() as turn, turn.assistant(model=served[1], provider=served[0]) as reply:
            reply.finish("hello", usage=Usage(input=1_000_000, output=0, total_tokens=1_000_000))
    tracer.close()
    recorder.flush()
    return recorder.drain_completed()[0]


SERVED_PRICES = {
    "openai/gpt-4o-mini": {"input": 0.15, "output": 0.6},
    "claude-opus-4-1": {"input": 15, "output": 75},
}
# `_served_session`'s usage_totals("model"): under the model that served its call.
SERVED_TOTAL = UsageTotal(
    key="openai/gpt-4o-mini",
    sessions=1,
    loops=1,
    usage=Usage(input=1_000_000, output=0, total_tokens=1_000_000),
)


def check_migrated_served_totals(store: SessionStore, session: Session) -> None:
    """A store migrated to sum its loops by serving model, holding `session` (a
    `_served_session`) and session ``bad`` (a `make_loop` of 7 tokens whose calls were
    not stored): each under its model, priced alike; a deleted session's loops go."""
    pricer = Pricer(SERVED_PRICES, use_table=False)
    assert store.usage_totals("model") == [
        UsageTotal(key="openai/gpt-4o", sessions=1, loops=1, usage=make_loop("bad", 1, tokens=7).usage),
        SERVED_TOTAL,
    ]
    assert store.usage_totals("model", pricer=pricer)[1].cost == pricer.session(session)
    store.delete(session.session_id)
    assert [total.key for total in store.usage_totals("model")] == ["openai/gpt-4o"]


def test_a_call_is_priced_at_the_model_that_served_it(tmp_path: Path) -> None:
    # A fallback model or a router served the reply: its price, not the loop config's.
    session = _served_session()
    pricer = Pricer(SERVED_PRICES, use_table=False)
    served = Cost(usd=0.15, sources=(USER_SOURCE,))
    record = session.loops[0]
    assert pricer.session(session) == served
    assert pricer.loop(record) == served
    assert pricer.turn(record.turns[0], record) == served
    assert pricer.breakdown(session).cost == served
    assert pricer.outline(session_outline(session)) == served
    with JsonDirStore(tmp_path / "store") as store:
        store.save(session)
        assert pricer.outline(store.load_outline(session.session_id)) == served
        [row] = store.usage_totals("model", pricer=pricer)
        assert row.cost == served  # keyed by the loop's config, priced by the call's model
    # A reply of the config's own model keeps the stored calls as they were.
    assert [call.served_by for call in record.model_calls()] == [("openai", "gpt-4o-mini")]


def test_each_reply_of_a_turn_is_a_call_on_its_own_model() -> None:
    # Priced as one call of the summed usage on the last reply's model it cost $0.0315;
    # the opus reply alone costs $1.65.
    session = replies_session()
    record = session.loops[0]
    assert [(call.usage, call.served_by) for call in record.model_calls()] == [
        (OPUS_THEN_MINI[0][2], None),
        (OPUS_THEN_MINI[1][2], ("openai", "gpt-4o-mini")),
    ]
    pricer = Pricer(SERVED_PRICES, use_table=False)
    expected = (100_000 * 15 + 2_000 * 75 + 100_000 * 0.15 + 500 * 0.6) / 1e6
    for cost in (
        pricer.session(session),
        pricer.loop(record),
        pricer.turn(record.turns[0], record),
        pricer.breakdown(session).loops[0].turns[0].cost,
        pricer.outline(session_outline(session)),
    ):
        assert cost.usd == pytest.approx(expected)


@needs_table
def test_each_reply_of_a_turn_is_priced_at_its_own_tier() -> None:
    # Two replies of 150k input tokens: neither above gemini-2.5-pro's 200k tier, their sum is.
    usage = Usage(input=150_000, output=1_000, total_tokens=151_000)
    replies = (("google", "gemini-2.5-pro", usage),) * 2
    session = replies_session(replies, configured=("google", "gemini-2.5-pro"))
    record = session.loops[0]
    when = record.turns[0].started_at
    one = table_usd(usage, "google", "gemini-2.5-pro", when)
    assert one * 2 < table_usd(usage + usage, "google", "gemini-2.5-pro", when)
    assert Pricer().loop(record).usd == pytest.approx(2 * one)
    assert Pricer().turn(record.turns[0], record).usd == pytest.approx(2 * one)


def test_a_dated_snapshot_of_the_configured_model_takes_the_users_price_of_it() -> None:
    # The APIs name the snapshot that served an alias (gpt-4o-2024-08-06 for gpt-4o), as
    # the adapters record it: a price the user set for the alias went unused.
    session = _served_session(("openai", "gpt-4o"), ("openai", "gpt-4o-2024-08-06"))
    alias_priced = Pricer({"openai/gpt-4o": {"input": 2.5, "output": 10}}, use_table=False)
    assert alias_priced.session(session) == Cost(usd=2.5, sources=(USER_SOURCE,))
    # A price of the snapshot itself, where the user set one, still wins.
    both = Pricer(
        {
            "openai/gpt-4o": {"input": 2.5, "output": 10},
            "openai/gpt-4o-2024-08-06": {"input": 1, "output": 1},
        },
        use_table=False,
    )
    assert both.session(session) == Cost(usd=1.0, sources=(USER_SOURCE,))
    # Another model whose name extends the configured one's is no snapshot of it.
    mini = _served_session(("openai", "gpt-4o"), ("openai", "gpt-4o-mini"))
    assert alias_priced.session(mini) == Cost(usd=None, unpriced=("openai/gpt-4o-mini",))


@pytest.mark.spec
def test_a_cut_off_reply_without_a_config_is_priced_at_its_model() -> None:
    # phi-core's own output: an aborted loop with no config snapshot whose cut-off reply
    # names openai/gpt-4o: priced, not unknown.
    from phi_session.codec import decode_session
    from tests.conftest import SPEC

    [path] = SPEC.glob("golden/recorder/*/sessions/0275b706-f86a-4522-8ce7-3cd23bf7586e.json")
    session = decode_session(path.read_bytes())
    pricer = Pricer({"openai/gpt-4o": {"input": 1, "output": 1}}, use_table=False)
    loops = [loop for loop in session.loops if loop.config is None and loop.billed_usage().total_tokens]
    assert loops
    for loop in loops:
        assert pricer.loop(loop).known, loop.loop_id
    assert pricer.session(session).known
