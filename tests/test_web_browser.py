"""The viewer page in a real headless Chromium, driven by Playwright.

The page runs under the server's strict Content-Security-Policy, which also
forbids Playwright's string-evaluating helpers (``wait_for_function``): the tests
wait with locators and URL predicates instead.

Playwright's Python package drives Debian's ``/usr/bin/chromium`` (no browser of
its own is downloaded: ``scripts/install-browser-deps.sh`` installs both). The
store holds the example sessions, the demo scenario when `phi_session.demo` is
there, and a session whose messages are HTML that must show as text and run
nothing. A screenshot of a session page is saved to ``artifacts/session-page.png``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from phi_session.cli.render import BIDI_CONTROLS, safe
from phi_session.cost import Pricer, prices_available
from phi_session.identity import AgentSession
from phi_session.instrument import Tracer
from phi_session.messages import ToolCall, Usage, extension_message
from phi_session.model import LoopConfigSnapshot, Session, SpawnRef
from phi_session.recorder import SessionRecorder
from phi_session.stores.conformance import make_loop, make_session, talking_loop
from phi_session.stores.json_dir import JsonDirStore
from phi_session.stores.sqlite import SqliteStore
from phi_session.web.server import ViewerServer

from .web_support import (
    CHILD_ID,
    CHILD_LOOP,
    EXAMPLE_IDS,
    PARALLEL_ID,
    PARALLEL_WINNER,
    PARENT_ID,
    PARENT_LOOP,
    ROOT,
    XSS_ID,
    XSS_REPLY,
    XSS_TEXT,
    example_lines,
    record_into,
    running_server,
    session_of_texts,
    xss_lines,
)

CHROMIUM = os.environ.get("PHI_SESSION_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright's Python package is missing (scripts/install-browser-deps.sh)"
)
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and shutil.which(CHROMIUM) is None:
    pytest.skip(
        f"no Chromium at {CHROMIUM} (scripts/install-browser-deps.sh installs Debian's)",
        allow_module_level=True,
    )

expect = sync_api.expect
Page = Any  # playwright.sync_api.Page, kept loose so the module imports without Playwright


@pytest.fixture(scope="module")
def demo_ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Store contents: the examples, the HTML session and (if available) the demo."""
    directory = tmp_path_factory.mktemp("browser-store")
    demo: list[str] = []
    with JsonDirStore(directory) as store:
        record_into(store, example_lines())
        record_into(store, xss_lines())
        try:
            from phi_session.demo import run_demo
        except ImportError:
            pass
        else:
            demo = [session.session_id for session in run_demo(store=store)]
    return {"directory": directory, "demo": demo}


@pytest.fixture(scope="module")
def server(demo_ids: dict[str, Any]) -> Iterator[ViewerServer]:
    with JsonDirStore(demo_ids["directory"]) as store, running_server(store) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            launched.close()


class Watched:
    """A page with every dialog, page error and console error recorded."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )

    def expect_failed_request(self, status: int) -> None:
        """Forget Chromium's console line for an HTTP error the test provoked on purpose."""
        self.errors = [e for e in self.errors if f"status of {status}" not in e]

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@contextmanager
def watched_page(browser: Any, url: str, *, height: int = 900, timeout: int = 20_000) -> Iterator[Watched]:
    """A page of the viewer at `url`; the default timeout is generous for a loaded CI
    machine (passing runs take about a second)."""
    context = browser.new_context(viewport={"width": 1280, "height": height}, base_url=url)
    context.set_default_timeout(timeout)
    watcher = Watched(context.new_page())
    try:
        yield watcher
    finally:
        context.close()
    # Any error or dialog fails the test that caused it (CSP violations included).
    assert watcher.errors == []
    assert watcher.dialogs == []


@pytest.fixture
def watched(browser: Any, server: ViewerServer) -> Iterator[Watched]:
    with watched_page(browser, server.url) as watcher:
        yield watcher


def loop_details(page: Page, loop_id: str) -> Any:
    return page.locator(f'details.loop[data-loop-id="{loop_id}"]')


@contextmanager
def first_loop_opened(browser: Any, tmp_path: Path, session: Session) -> Iterator[tuple[Page, Any]]:
    """The page of `session`, saved alone in a new store, and its first loop, opened."""
    with SqliteStore(tmp_path / "one.db") as store, running_server(store) as running:
        store.save(session)
        with watched_page(browser, running.url) as watcher:
            page = watcher.page
            page.goto(f"/#/session/{session.session_id}")
            details = loop_details(page, session.loops[0].loop_id)
            details.locator("summary").first.click()
            yield page, details


def test_session_list_and_filters(watched: Watched, demo_ids: dict[str, Any]) -> None:
    page = watched.page
    page.goto("/")
    page.wait_for_selector("#sessions")
    total = len(EXAMPLE_IDS) + 1 + len(demo_ids["demo"])
    assert page.locator("#session-count").inner_text() == f"{total} sessions"
    assert page.locator("#sessions tbody tr").count() == total
    page.fill("input[name=model]", "openai/gpt-4o")
    page.click("#filters button[type=submit]")
    expect(page.locator("#session-count")).to_have_text("1 session")
    assert page.locator("#sessions tbody a.session-link").inner_text() == PARALLEL_ID
    assert "model=openai%2Fgpt-4o" in page.url
    page.select_option("select[name=status]", "Aborted")
    page.click("#filters button[type=submit]")
    expect(page.locator("#session-count")).to_have_text("0 sessions")
    page.fill("input[name=since]", "not a time")
    page.click("#filters button[type=submit]")
    assert "since" in page.locator(".error-banner").inner_text()
    watched.expect_failed_request(400)
    page.click("text=Clear")
    expect(page.locator("#session-count")).to_have_text(f"{total} sessions")


def test_open_session_expand_loop_and_follow_sub_agent_links(watched: Watched) -> None:
    page = watched.page
    page.goto("/")
    page.click(f"a.session-link:text-is('{PARENT_ID}')")
    page.wait_for_selector("#loop-tree")
    assert PARENT_ID in page.locator("h1").inner_text()
    loop = loop_details(page, PARENT_LOOP)
    assert loop.get_attribute("open") is None
    assert not loop.locator(".turn").first.is_visible()
    loop.locator("summary").first.click()
    assert loop.get_attribute("open") is not None
    turns = loop.locator(".turn")
    expect(turns).to_have_count(2)  # loaded when the loop first opens
    assert turns.first.is_visible()
    first_turn = turns.first.inner_text()
    assert "Turn 0" in first_turn and "triggered by User" in first_turn
    assert "How hot must water be to boil at sea level?" in first_turn  # input message
    assert "→ researcher" in first_turn and '"task"' in first_turn  # the tool call and its arguments
    assert "Water boils at 100 °C (212 °F) at sea level." in first_turn  # the tool result
    # phi-core's input_messages hold the tool result too: shown once, after the call.
    assert loop.inner_text().count("Water boils at 100 °C (212 °F) at sea level.") == 1
    assert first_turn.index("→ researcher") < first_turn.index("Water boils at 100 °C (212 °F)")
    assert "At sea level, water boils at 100 °C, which is 212 °F." in turns.nth(1).inner_text()

    loop.locator("a", has_text=CHILD_ID).click()
    page.wait_for_selector("#parent-link")
    assert CHILD_ID in page.url
    assert CHILD_ID in page.locator("h1").inner_text()
    child_loop = loop_details(page, CHILD_LOOP)
    assert child_loop.get_attribute("open") is not None  # the linked loop is opened and highlighted
    assert "highlight" in (child_loop.get_attribute("class") or "")

    page.locator("#parent-link a").click()
    page.wait_for_url(lambda url: PARENT_ID in url)
    page.wait_for_selector(f'details.loop[data-loop-id="{PARENT_LOOP}"][open]')
    assert PARENT_ID in page.locator("h1").inner_text()


def test_parallel_winner_and_event_log(watched: Watched) -> None:
    page = watched.page
    page.goto(f"/#/session/{PARALLEL_ID}")
    page.wait_for_selector("#loop-tree")
    winner = loop_details(page, PARALLEL_WINNER).locator("summary").first
    assert "★ parallel winner" in winner.inner_text()
    assert page.locator("#loop-tree summary", has_text="parallel, not selected").count() == 1
    page.click("#show-events")
    page.wait_for_selector("#event-log")
    rows = page.locator("#event-log tbody tr")
    assert rows.count() == 18
    assert rows.first.inner_text().split()[:3] == ["#1", "0", "AgentStart"]
    page.click("#show-events")
    assert page.locator("#event-log").count() == 0


def test_html_in_messages_is_text_and_runs_nothing(watched: Watched) -> None:
    page = watched.page
    page.goto(f"/#/session/{XSS_ID}")
    page.wait_for_selector("#loop-tree")
    page.click("text=Expand loaded loops")
    page.get_by_text(XSS_TEXT, exact=True).first.wait_for()
    expect(page.get_by_text(XSS_TEXT, exact=True).first).to_be_visible()
    expect(page.get_by_text(XSS_REPLY, exact=True).first).to_be_visible()  # may render a moment later
    assert page.locator("#app img, #app script, #app b").count() == 0
    page.click("#show-events")
    page.wait_for_selector("#event-log")
    page.wait_for_timeout(300)  # give a stray onerror handler the time to fire
    assert watched.dialogs == []
    assert page.evaluate("document.querySelectorAll('img').length") == 0


def test_bidi_controls_are_shown_as_the_cli_shows_them(browser: Any, tmp_path: Path) -> None:
    # A name holding U+202E read backwards ("agent\u202e1-toor" showed as "agentroot-1").
    controls = "".join(map(chr, BIDI_CONTROLS))
    agent, tool = f"agent{controls}1-toor", "search\u202e"
    session = make_session("bidi", agent, loops=[make_loop("bidi", 1)], parent_session_id="parent")
    session = msgspec.structs.replace(
        session,
        parent_spawn_ref=SpawnRef(
            parent_session_id="parent", parent_loop_id="parent.cfg.1", tool_call_id="call-9", tool_name=tool
        ),
    )
    with JsonDirStore(tmp_path) as store, running_server(store) as server:
        store.save(session)
        with watched_page(browser, server.url) as watcher:
            page = watcher.page
            page.goto("/#/session/bidi")
            page.locator("#parent-link").wait_for()
            text = page.locator("#app").inner_text()
            assert safe(agent) in text and safe(tool) in page.locator("#parent-link").inner_text()
            assert not set(text) & set(controls)
            assert (
                page.locator("dd .mono").first.evaluate("e => getComputedStyle(e).unicodeBidi") == "isolate"
            )
            page.goto("/")
            row = page.locator("#sessions tbody tr").first
            row.wait_for()
            assert safe(agent) in row.inner_text()
            assert row.locator("td.mono").first.get_attribute("title") == safe(agent)


def test_unknown_session_shows_an_error(watched: Watched) -> None:
    page = watched.page
    page.goto("/#/session/no-such-session")
    banner = page.locator(".error-banner")
    banner.wait_for()
    assert banner.inner_text().startswith("404")
    watched.expect_failed_request(404)


def test_malformed_address_shows_an_error(watched: Watched) -> None:
    page = watched.page
    page.goto("/#/stats")
    page.locator(".view-stats").wait_for()
    page.evaluate("location.hash = '#/session/%E0'")  # not valid percent-encoded UTF-8
    banner = page.locator(".view-error .error-banner")
    banner.wait_for()
    assert "malformed address #/session/%E0" in banner.inner_text()
    assert page.locator(".view-stats").count() == 0  # the previous page is gone


def test_usage_page(watched: Watched) -> None:
    page = watched.page
    page.goto("/#/stats")
    page.wait_for_selector("#stats")
    page.select_option("#stats-by", "model")
    page.wait_for_url(lambda url: url.endswith("#/stats?by=model"))
    page.wait_for_selector("#stats th:text-is('model')")
    assert "openai/gpt-4o" in page.locator("#stats").inner_text()


def test_loop_tree_shows_every_loop_while_closed(watched: Watched, demo_ids: dict[str, Any]) -> None:
    if not demo_ids["demo"]:
        pytest.skip("the demo scenario module is not there yet")
    page = watched.page
    page.goto(f"/#/session/{demo_ids['demo'][0]}")
    page.wait_for_selector("#loop-tree")
    loops = page.locator("#loop-tree details.loop")
    assert loops.count() >= 5
    for index in range(loops.count()):  # nested continuations too, without opening anything
        assert loops.nth(index).locator("summary").first.is_visible()
        assert loops.nth(index).get_attribute("open") is None
    assert page.locator("#loop-tree .children details.loop").count() >= 1
    assert page.locator("#loop-tree .chip.winner").count() == 1
    assert page.locator("#loop-tree .chip.status-Rejected").count() >= 1


def test_session_page_screenshot(watched: Watched, demo_ids: dict[str, Any]) -> None:
    """Saves artifacts/session-page.png (the loop tree, the sub-agent loop open) and the list."""
    page = watched.page
    session_id = demo_ids["demo"][0] if demo_ids["demo"] else PARENT_ID
    page.goto(f"/#/session/{session_id}")
    page.wait_for_selector("#loop-tree")
    spawning = page.locator("#loop-tree details.loop", has=page.locator(".subagent-link")).first
    spawning.locator("summary").first.click()
    ARTIFACTS.mkdir(exist_ok=True)
    target = ARTIFACTS / "session-page.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000
    page.goto("/")
    page.wait_for_selector("#sessions")
    page.screenshot(path=str(ARTIFACTS / "session-list.png"))


# -- timeline, charts, paging, chat, a huge session (issue 14) -------------------------------


def test_timeline_hover_and_click_opens_the_turn(watched: Watched, demo_ids: dict[str, Any]) -> None:
    page = watched.page
    page.goto(f"/#/session/{PARENT_ID}")
    page.wait_for_selector("#timeline")
    kinds = page.locator("#timeline g.bar").evaluate_all("bars => bars.map(b => b.dataset.kind)")
    assert kinds[0] == "session" and {"loop", "turn", "model", "tool"} <= set(kinds)
    assert kinds.count("session") == 2  # the sub-agent's session, inline
    sub_agent = page.locator("#timeline g.bar-session", has_text=CHILD_ID)
    assert "clickable" in (sub_agent.get_attribute("class") or "")  # it opens that session
    tool = page.locator("#timeline g.bar-tool", has_text="researcher").first
    title = tool.locator("title").text_content() or ""
    assert "researcher" in title and "from 2025-" in title
    turn = page.locator("#timeline g.bar-turn", has_text="turn 1").last  # the parent's second turn
    assert "tokens" in (turn.locator("title").text_content() or "")  # tokens on hover
    turn.click()
    loop = loop_details(page, PARENT_LOOP)
    expect(loop).to_have_attribute("open", "")
    highlighted = loop.locator(".turn.highlight")
    expect(highlighted).to_have_count(1)
    assert highlighted.get_attribute("data-turn-index") == "1"
    ARTIFACTS.mkdir(exist_ok=True)
    session_id = demo_ids["demo"][0] if demo_ids["demo"] else PARENT_ID
    page.goto(f"/#/session/{session_id}")
    expect(page.locator("h1")).to_contain_text(session_id)  # the new page, not the old one's timeline
    page.wait_for_selector("#timeline")
    page.locator("#timeline-holder").screenshot(path=str(ARTIFACTS / "timeline.png"))


def test_chat_view_of_a_loop(watched: Watched) -> None:
    page = watched.page
    page.goto(f"/#/session/{PARENT_ID}")
    loop = loop_details(page, PARENT_LOOP)
    loop.locator("summary").first.click()
    loop.locator("button.view-chat").click()
    chat = loop.locator(".chat")
    expect(chat).to_be_visible()
    assert chat.locator(".bubble-user").first.inner_text().startswith("How hot must water be")
    tool = chat.locator("details.chat-tool").first
    assert "researcher" in tool.locator("summary").inner_text()
    assert tool.get_attribute("open") is None  # folded
    assert not loop.locator(".structured").is_visible()
    loop.locator("button.view-structured").click()
    expect(loop.locator(".structured")).to_be_visible()


def test_event_log_type_filter(watched: Watched) -> None:
    page = watched.page
    page.goto(f"/#/session/{PARALLEL_ID}")
    page.click("#show-events")
    page.wait_for_selector("#event-log")
    page.select_option("#event-type", "AgentStart")
    expect(page.locator("#event-count")).to_contain_text("of 2 events")
    types = page.locator("#event-log tbody tr td:nth-child(3)").all_inner_texts()
    assert types == ["AgentStart", "AgentStart"]


def test_usage_charts(watched: Watched) -> None:
    page = watched.page
    page.goto("/#/stats")
    page.wait_for_selector("#chart-day")
    for by in ("day", "model", "agent"):
        assert page.locator(f"#chart-{by} g.chart-bar").count() >= 1
    models = page.locator("#chart-model g.chart-bar title").all_text_contents()
    assert any(text.startswith("openai/gpt-4o\n") and "tokens" in text for text in models)
    # Cost over time, by model and by agent, filled in once priced.
    page.wait_for_selector("#cost-chart-agent")
    for by in ("day", "model", "agent"):
        assert (
            page.locator(f"#cost-chart-{by} g.chart-bar").count()
            == page.locator(f"#chart-{by} g.chart-bar").count()
        )
    costs = dict(
        zip(
            page.locator("#cost-chart-model .bar-label").all_text_contents(),
            page.locator("#cost-chart-model .bar-note").all_text_contents(),
            strict=True,
        )
    )
    assert set(costs) == set(page.locator("#chart-model .bar-label").all_text_contents())
    assert (
        costs["openai/gpt-4o"].startswith("$") if prices_available() else costs["openai/gpt-4o"] == "unknown"
    )
    gpt = page.locator("#cost-chart-model g.chart-bar", has_text="openai/gpt-4o")
    assert "tokens" in (gpt.locator("title").text_content() or "")
    page.locator(".charts").screenshot(path=str(ARTIFACTS / "usage-charts.png"))


def test_cost_charts_show_an_unknown_price_as_unknown(browser: Any, demo_ids: dict[str, Any]) -> None:
    # Only Sonnet has a price: every other model's cost is unknown, drawn as "?" and
    # "unknown" with no bar, never as $0; a group holding it is unknown too.
    pricer = Pricer({"claude-sonnet-4-5": {"input": 3, "output": 15}}, use_table=False)
    with JsonDirStore(demo_ids["directory"]) as store, running_server(store, pricer=pricer) as server:
        with watched_page(browser, server.url, height=1400) as watcher:
            page = watcher.page
            page.goto("/#/stats")
            page.wait_for_selector("#cost-chart-agent")
            model = page.locator("#cost-chart-model g.chart-bar")
            sonnet = model.filter(has_text="anthropic/claude-sonnet-4-5")
            assert sonnet.locator("rect.part-cost").count() == 1
            assert (sonnet.locator(".bar-note").text_content() or "").startswith("$")
            haiku = model.filter(has_text="anthropic/claude-haiku-4-5")
            assert (
                haiku.locator("rect").count() == 0 and haiku.locator(".bar-note").text_content() == "unknown"
            )
            assert "no price for anthropic/claude-haiku-4-5" in (haiku.locator("title").text_content() or "")
            assert page.locator("#cost-chart-day .bar-note.unknown", has_text="?").count() >= 1
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator(".charts").screenshot(path=str(ARTIFACTS / "usage-charts-unknown.png"))


def test_tokens_reported_only_as_a_total_are_not_called_a_missing_price(browser: Any, tmp_path: Path) -> None:
    # The model has a price, but the calls counted their tokens only as a total: the
    # viewer says so, as the CLI does, rather than "no price".
    with JsonDirStore(tmp_path) as store:
        loop = talking_loop("total-only", 1, "count the beans")
        loop.usage = Usage(input=0, output=0, total_tokens=777)
        store.save(make_session("total-only", "alpha", loops=[loop]))
        pricer = Pricer({"openai/gpt-4o": {"input": 1, "output": 2}}, use_table=False)
        note = "cost unknown (tokens not split by kind for openai/gpt-4o)"
        with running_server(store, pricer=pricer) as server, watched_page(browser, server.url) as watcher:
            page = watcher.page
            page.goto("/")
            expect(page.locator("#sessions td.cost")).to_have_text(note)
            page.goto("/#/session/total-only")
            expect(page.locator("#session-cost")).to_have_text(note)
            page.goto("/#/stats?by=model")
            page.wait_for_selector("#cost-chart-model")
            title = page.locator("#cost-chart-model g.chart-bar title").text_content() or ""
            assert note in title and "no price" not in title
            expect(page.locator("#stats td.cost")).to_have_text(note)


def test_session_list_pages_by_keyset(watched: Watched, demo_ids: dict[str, Any]) -> None:
    page = watched.page
    total = len(EXAMPLE_IDS) + 1 + len(demo_ids["demo"])
    page.goto("/#/?limit=3")
    page.wait_for_selector("#sessions")
    seen: list[str] = []
    while True:
        page.wait_for_selector("#sessions")
        rows = page.locator("#sessions a.session-link").all_inner_texts()
        seen += rows
        if page.locator("#next-page").count() == 0:
            break
        before = page.url
        page.click("#next-page")
        page.wait_for_url(lambda url, before=before: url != before and "after=" in url)
        expect(page.locator("#first-page")).to_be_visible()
        # The address changes before the next page's rows replace this page's.
        expect(page.locator("#sessions a.session-link").first).not_to_have_text(rows[0])
    assert len(seen) == len(set(seen)) == total
    prompt = page.locator("#sessions td.prompt").first
    expect(prompt).not_to_have_text("…")
    expect(page.locator("#sessions td.cost").first).to_contain_text(re.compile(r"^(\$|cost unknown)"))


@pytest.fixture(scope="module")
def huge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerServer]:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_viewer import huge_session

    directory = tmp_path_factory.mktemp("huge-store")
    with SqliteStore(directory / "huge.db") as store, pytest.MonkeyPatch.context() as patch:
        store.save(huge_session(600))

        def no_whole_session(self: SqliteStore, session_id: str) -> Session:
            raise AssertionError(f"the viewer loaded the whole session {session_id}")

        patch.setattr(SqliteStore, "load", no_whole_session)  # every view reads pages of loops
        with running_server(store) as running:
            yield running


def test_huge_session_opens_paged(browser: Any, huge_server: ViewerServer) -> None:
    with watched_page(browser, huge_server.url, timeout=60_000) as watcher:
        page = watcher.page
        page.goto("/#/session/huge-session")
        page.wait_for_selector("#loop-tree")
        assert page.locator("#loop-tree details.loop").count() == 200  # one page, not 600
        expect(page.locator("#loop-count")).to_have_text("200 of 600 loops shown")
        page.click("#more-loops")
        expect(page.locator("#loop-tree details.loop")).to_have_count(400)
        # The timeline: 20 loops of 15 bars (loop, 4 turns, 4 model and 6 tool calls) and
        # the session's bar; scrolling to the end of its box loads the next 20 loops.
        bars = page.locator("#timeline g.bar")
        expect(bars).to_have_count(1 + 20 * 15)
        expect(page.locator("#timeline-count")).to_contain_text("301 bars for 20 of 600 loops")
        page.locator("#timeline-wrap").evaluate("box => { box.scrollTop = box.scrollHeight; }")
        expect(bars).to_have_count(1 + 40 * 15)
        page.locator("#timeline-wrap").evaluate("box => { box.scrollTop = box.scrollHeight; }")
        expect(bars).to_have_count(1 + 60 * 15)
        page.locator("#timeline-wrap").screenshot(path=str(ARTIFACTS / "huge-timeline.png"))
        # A chain of 600 continuations: past 10 levels the tree stops moving right (the
        # deepest loops were squeezed to a few pixels) and stops nesting (2,000 nested
        # loops crashed the tab): loop #151 is no deeper in the page than loop #21.
        deep = loop_details(page, "huge-session.loop.150").bounding_box()
        assert deep is not None and deep["width"] > 600, deep
        depths = [
            loop_details(page, f"huge-session.loop.{index}").evaluate(
                "node => { let depth = 0; for (; node; node = node.parentElement) depth++; return depth; }"
            )
            for index in (20, 150, 399)
        ]
        assert depths[0] == depths[1] == depths[2] < 60, depths
        late = page.locator('#timeline g.bar-loop[data-loop-index="45"]')
        title = late.locator("title").text_content() or ""
        assert "loop #46" in title and ("$" in title or "unknown" in title)  # priced with its page
        page.locator('#timeline g.bar-turn[data-loop-index="45"]').nth(2).click()  # its third turn
        loop = loop_details(page, "huge-session.loop.45")
        expect(loop).to_have_attribute("open", "")
        expect(loop.locator(".turn.highlight")).to_have_attribute("data-turn-index", "2")
        page.evaluate("window.scrollTo(0, 0)")
        page.click("#show-events")
        expect(page.locator("#event-log tbody tr")).to_have_count(200)
        page.click("#more-events")
        expect(page.locator("#event-log tbody tr")).to_have_count(400)
        page.screenshot(path=str(ARTIFACTS / "huge-session.png"))
        # A link to a loop the session does not hold: every page looked through, then said.
        page.goto("/#/session/huge-session?loop=huge-session.loop.nope")
        expect(page.locator("#loop-count")).to_have_text("600 of 600 loops shown")
        banner = page.locator(".view-session .error-banner")
        expect(banner).to_contain_text("no loop huge-session.loop.nope in this session")


def test_a_loop_cut_off_shows_its_conversation(browser: Any, tmp_path: Path) -> None:
    # Its messages come with AgentEnd: a loop whose process died has none, but its turns
    # and events hold the conversation; the chat view and the listing's prompt read them.
    recorder = SessionRecorder()
    config = LoopConfigSnapshot(model="m", provider="p")
    loop = Tracer(AgentSession(session_id="cut-off"), sinks=[recorder], config=config).loop().start()
    loop.user("What is in notes.txt?")
    with loop.turn() as turn:
        with turn.assistant() as reply:
            reply.finish("Let me look.", tool_calls=[ToolCall(id="c1", name="read_file", arguments={})])
        with turn.tool(turn.tool_calls[0]) as tool:
            tool.result("buy milk")
    recorder.flush()  # the loop never ended: Aborted, without messages
    [session] = recorder.drain_completed()
    assert session.loops[0].status == "Aborted" and not session.loops[0].messages
    with SqliteStore(tmp_path / "cut.db") as store, running_server(store) as running:
        store.save(session)
        with watched_page(browser, running.url) as watcher:
            page = watcher.page
            page.goto("/")
            expect(page.locator("#sessions tbody td.prompt")).to_have_text("What is in notes.txt?")
            page.goto("/#/session/cut-off")
            details = loop_details(page, session.loops[0].loop_id)
            details.locator("summary").first.click()
            details.locator("button.view-chat").click()
            chat = details.locator(".chat")
            expect(chat.locator(".bubble-user")).to_have_text("What is in notes.txt?")
            expect(chat.locator("details.chat-tool summary")).to_contain_text("read_file")


def test_a_loop_saved_over_since_the_list_shows_an_error_not_another_loops_turns(
    browser: Any, tmp_path: Path
) -> None:
    # Deleted and saved again under its id: opening loop #1 of the list read before showed
    # the new loop #1's turns under the old loop's header.
    before, after = (talking_loop("again", number, said) for number, said in ((1, "before"), (7, "after")))
    with SqliteStore(tmp_path / "s.db") as store, running_server(store) as running:
        store.save(make_session("again", loops=[before]))
        with watched_page(browser, running.url) as watcher:
            page = watcher.page
            page.goto("/#/session/again")
            details = loop_details(page, before.loop_id)
            details.wait_for()
            store.delete("again")
            store.save(make_session("again", loops=[after]))
            details.locator("summary").first.click()
            expect(details.locator(".error-banner")).to_contain_text("no longer the loop listed here")
            assert "done after" not in details.inner_text()


def test_extension_messages_show_their_kind_and_data_whatever_their_role(
    browser: Any, tmp_path: Path
) -> None:
    # phi-core reads {"role": "user", "kind", "data"} (no content) as an extension message:
    # the page drew such messages as empty user and assistant messages.
    recorder = SessionRecorder()
    tracer = Tracer(
        AgentSession(session_id="ext"), sinks=[recorder], config=LoopConfigSnapshot(model="m", provider="p")
    )
    with tracer.loop() as loop:
        loop.user("Go on?")
        loop.user(extension_message("user", "approval", {"approved_by": "alice"}))
        loop.user(extension_message("assistant", "plan", {"steps": ["read", "answer"]}))
        with loop.turn() as turn, turn.assistant() as reply:
            reply.finish("Done.")
    tracer.close()
    recorder.flush()
    [session] = recorder.drain_completed()
    # The recorder keeps no "assistant" message among a turn's inputs; phi-core's JSON may.
    [loop] = session.loops
    turn = loop.turns[0]
    turn = msgspec.structs.replace(turn, input_messages=(*turn.input_messages, loop.messages[2]))
    session = msgspec.structs.replace(session, loops=[msgspec.structs.replace(loop, turns=(turn,))])
    with first_loop_opened(browser, tmp_path, session) as (_, details):
        extensions = details.locator(".structured .msg-extension")
        expect(extensions).to_have_count(2)
        assert "approval" in extensions.first.inner_text() and "alice" in extensions.first.inner_text()
        assert "plan" in extensions.nth(1).inner_text() and "answer" in extensions.nth(1).inner_text()
        assert details.locator(".structured .msg-user").all_inner_texts()[0].endswith("Go on?")
        assert details.locator(".structured .msg-user, .structured .msg-assistant").count() == 2
        details.locator("button.view-chat").click()  # the conversation: no empty bubbles
        assert details.locator(".chat .bubble").all_inner_texts() == ["Go on?", "Done."]


def test_a_long_text_shows_cut_and_whole_on_demand_as_text(browser: Any, tmp_path: Path) -> None:
    """A loop of twelve 5 MB tool results came whole to the page: 91 MB for the loop,
    303 MB for a page of its events."""
    long = XSS_TEXT + "\n" + "r" * 100_000
    size = f"{len(long.encode()):,}"
    session = session_of_texts("long", [long, "short"])
    with first_loop_opened(browser, tmp_path, session) as (page, details):
        result = details.locator(".structured .msg-toolResult").first
        expect(result.locator(".block.text .clipped")).to_contain_text(f"\u2026 [clipped: {size} bytes]")
        assert (result.locator(".block.text").text_content() or "").startswith(long[:1000])
        result.locator("button.show-all", has_text=f"show all ({size} bytes)").click()
        expect(result.locator("button.show-all")).to_have_count(0)
        assert result.locator(".block.text").text_content() == long
        assert "short" in details.locator(".structured .msg-toolResult").nth(1).inner_text()
        # In the event log, the cut text is a JSON string of the event's, whole on demand.
        page.click("#show-events")
        row = page.locator("#event-log tbody tr", has_text="ToolExecutionEnd").first
        row.locator("summary").click()
        event = row.locator("pre")
        expect(event).to_contain_text(f"[clipped: {size} bytes]")
        event.locator("button.show-all").click()
        expect(event.locator("button.show-all")).to_have_count(0)
        assert msgspec.json.encode(long).decode() in (event.text_content() or "")
        assert page.locator("#app img, #app script").count() == 0  # the HTML in it stayed text


def test_search_box_and_cost(watched: Watched) -> None:
    page = watched.page
    page.goto("/")
    page.fill("#search-form input[name=q]", "boils")
    page.press("#search-form input[name=q]", "Enter")
    page.wait_for_selector("#hits")
    assert "q=boils" in page.url
    marks = page.locator("#hits mark").all_inner_texts()
    assert marks and all(mark.lower().startswith("boil") for mark in marks)
    page.locator("#hits a.hit-link", has_text=PARENT_ID).first.click()
    page.wait_for_selector("#loop-tree")
    expect(page.locator("#session-cost")).to_be_visible()  # a figure, or "cost unknown", never a silent 0
    page.goto("/#/stats?by=model")
    page.wait_for_selector("#stats")
    expect(page.locator("#stats th", has_text="Cost (USD)")).to_have_count(1)


def test_a_long_key_shows_cut_and_whole_on_demand(browser: Any, tmp_path: Path) -> None:
    """A key was never cut: one argument under a key of 5,000,000 characters came whole."""
    key = XSS_TEXT + "k" * 100_000
    size = f"{len(key.encode()):,}"
    session = session_of_texts("long-key", ["done"], "v", key)
    with first_loop_opened(browser, tmp_path, session) as (page, details):
        arguments = details.locator(".structured .block.toolcall pre").first
        expect(arguments).to_contain_text(f"\u2026 [clipped: {size} bytes]")
        assert '"v"' in (arguments.text_content() or "")
        arguments.locator("button.show-all", has_text=f"show all ({size} bytes)").click()
        expect(arguments.locator("button.show-all")).to_have_count(0)
        assert arguments.text_content() == "{\n  " + msgspec.json.encode(key).decode() + ': "v"\n}'
        assert page.locator("#app img, #app script").count() == 0  # the HTML in it stayed text
