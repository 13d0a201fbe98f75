"""Cost of stored usage: genai-prices for known models, user prices, unknown models."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest

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
from phi_session.messages import Usage
from phi_session.stores.conformance import at, make_loop, make_session

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


@needs_table
def test_an_unknown_provider_name_falls_back_to_the_model() -> None:
    pricer = Pricer()
    assert pricer.price(USAGE, "my-gateway", "gpt-4o", WHEN) == pricer.price(USAGE, "openai", "gpt-4o", WHEN)


def test_unknown_model_is_unknown_never_zero() -> None:
    cost = Pricer().price(USAGE, "acme", "secret-model-9", WHEN)
    assert cost == Cost(usd=None, unpriced=("acme/secret-model-9",))
    assert not cost.known
    assert (cost + Cost(usd=1.0, sources=(USER_SOURCE,))).usd is None  # a sum with an unknown part is unknown


def test_no_tokens_cost_nothing_whatever_the_model() -> None:
    assert Pricer().price(Usage(input=0, output=0), "acme", "secret-model-9", WHEN) == ZERO_COST


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
        ({"m": {"input": -1, "output": 1}}, "input must be a non-negative number"),
        ({"m": {"input": 1, "output": 1, "colour": 1}}, "colour"),
        ({"": {"input": 1, "output": 1}}, "non-empty"),
    ],
)
def test_bad_user_prices_are_refused(prices: dict, fragment: str) -> None:
    with pytest.raises(InvalidPrices, match=fragment):
        Pricer(prices)


def test_unreadable_price_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidPrices, match="cannot read prices"):
        Pricer.from_file(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InvalidPrices, match="expected a table"):
        Pricer.from_file(tmp_path / "list.json")


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
    with pytest.raises(InvalidQuery, match="group_by"):
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
