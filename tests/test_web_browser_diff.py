"""The viewer's Compare page in headless Chromium: from a fork to its parent, any two loops.

Uses the browser of `test_web_browser` (skipped with it when Chromium or Playwright
is missing). Saves a screenshot of a fork's diff to ``artifacts/diff-page.png``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest

from phi_session.model import Session
from phi_session.stores.json_dir import JsonDirStore
from phi_session.web.server import ViewerServer

from .diff_support import BASE, Run, Step, Stored, record_runs, record_turnless, store_fork
from .test_web_browser import ARTIFACTS, Watched, browser, expect, loop_details
from .web_support import running_server

HOSTILE = "<img src=x onerror=alert(1)>"
FORK = [*BASE[:2], Step("Saturday: Orsay.\nSunday: Louvre.\nBring sunglasses."), Step(HOSTILE)]

__all__ = ["browser"]  # the shared Chromium, a fixture of this module too


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    return store_fork(tmp_path_factory.mktemp("diff-browser-store"), FORK)


@pytest.fixture(scope="module")
def replayed(runs: Stored) -> tuple[str, str]:
    """A session holding a run and its replay (``Rerun{replay}``): its id and the replay's loop id."""
    session, (_, replay) = record_runs([Run(BASE), Run(BASE, fork_of=0, replay=True)])
    with JsonDirStore(runs.directory) as store:
        store.save(session)
    return session.session_id, replay


@pytest.fixture(scope="module")
def turnless(runs: Stored) -> tuple[Session, dict[str, str]]:
    """A session of loops without turns (`record_turnless`), in the store of `runs`."""
    return record_turnless(runs.directory)


@pytest.fixture(scope="module")
def server(
    runs: Stored, replayed: tuple[str, str], turnless: tuple[Session, dict[str, str]]
) -> Iterator[ViewerServer]:
    with JsonDirStore(runs.directory) as store, running_server(store) as running:
        yield running


@pytest.fixture
def watched(browser: Any, server: ViewerServer) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=server.url)
    context.set_default_timeout(20_000)
    watcher = Watched(context.new_page())
    try:
        yield watcher
    finally:
        context.close()
    assert watcher.errors == []
    assert watcher.dialogs == []


def test_compare_a_fork_with_its_parent(watched: Watched, runs: Stored) -> None:
    page = watched.page
    page.goto(f"/#/session/{runs.forked.session_id}")
    parent = loop_details(page, runs.parent)
    parent.locator("summary").first.click()
    assert parent.locator("a.compare-parent").count() == 0  # an origin has no parent to compare with
    fork = loop_details(page, runs.fork)
    fork.locator("summary").first.click()
    fork.locator("a.compare-parent").click()
    page.wait_for_url(lambda url: "#/diff?" in url)
    divergence = page.locator(".loop-diff .first-divergence")
    expect(divergence).to_have_text("First divergence: turn 2: output.text changed")
    turns = page.locator(".diff-turn")
    expect(turns).to_have_count(4)
    classes = [turns.nth(index).get_attribute("class") or "" for index in range(4)]
    assert [c.split()[-1] for c in classes] == ["diff-equal", "diff-equal", "diff-changed", "diff-added"]
    changed = turns.nth(2)
    assert changed.locator(".diff-changes td.diff-path").first.inner_text() == "output.text"
    assert changed.locator("pre.unified .del").first.inner_text().strip() == "-Saturday: Louvre."
    assert changed.locator("pre.unified .add").first.inner_text().strip() == "+Saturday: Orsay."
    sides = page.locator(".diff-sides").inner_text()
    assert "Branch:fork" in sides and "Initial" in sides
    # The added turn's text is HTML, shown as text: nothing of it runs or renders.
    expect(turns.nth(3).get_by_text(HOSTILE, exact=True)).to_be_visible()
    assert page.locator("#app img").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "diff-page.png"), full_page=True)
    turns.nth(2).locator("a.turn-link", has_text="open B").click()  # back to the fork's turn
    expect(loop_details(page, runs.fork).locator(".turn.highlight")).to_have_attribute("data-turn-index", "2")


def test_a_replay_compared_with_its_parent_does_not_diverge(
    watched: Watched, replayed: tuple[str, str]
) -> None:
    page = watched.page
    session_id, replay = replayed
    page.goto(f"/#/session/{session_id}")
    loop = loop_details(page, replay)
    loop.locator("summary").first.click()
    loop.locator("a.compare-parent").click()
    expect(page.locator(".loop-diff .first-divergence")).to_have_text(
        "No divergence: the runs match in content (timing, tokens, model and ids aside)."
    )
    assert "Rerun:replay" in page.locator(".diff-sides").inner_text()
    expect(page.locator(".diff-turn.diff-equal")).to_have_count(3)


def test_a_rejected_input_against_a_compaction_pass(
    watched: Watched, turnless: tuple[Session, dict[str, str]]
) -> None:
    page = watched.page
    session, ids = turnless
    query = urlencode({"a": f"{session.session_id}:{ids['injection']}", "b": f"{session.session_id}:#3"})
    page.goto(f"/#/diff?{query}")
    expect(page.locator(".loop-diff .first-divergence")).to_have_text(
        "First divergence: loop.status changed (and 1 more)"
    )
    rows = page.locator(".diff-loop-changes tbody tr")
    expect(rows).to_have_count(2)
    cells = [rows.nth(index).locator("td").all_inner_texts() for index in range(2)]
    assert [[cell.strip() for cell in row] for row in cells] == [
        ["loop.status", "Rejected", "Completed"],
        ["loop.rejection", "prompt injection", "null"],
    ]
    expect(page.locator(".diff-turns")).to_have_text("No turns on either side.")


def test_pick_any_two_loops_across_sessions(watched: Watched, runs: Stored) -> None:
    page = watched.page
    page.goto(f"/#/session/{runs.other.session_id}")
    only = page.locator("details.loop").first
    only.locator("summary").first.click()
    only.locator("button.pick-compare").click()
    expect(page.locator("#compare-bar")).to_contain_text("press Compare… on another loop")
    page.goto(f"/#/session/{runs.forked.session_id}")
    parent = loop_details(page, runs.parent)
    parent.locator("summary").first.click()
    parent.locator("button.pick-compare").click()
    page.wait_for_url(lambda url: "#/diff?" in url)
    expect(page.locator(".loop-diff .first-divergence")).to_have_text(
        "No divergence: the runs match in content (timing, tokens, model and ids aside)."
    )
    assert page.locator("#compare-bar").count() == 0
    expect(page.locator(".diff-turn.diff-equal")).to_have_count(3)


def test_the_compare_form_and_a_session_diff(watched: Watched, runs: Stored) -> None:
    page = watched.page
    page.goto("/#/diff")
    expect(page.locator("[data-nav=diff]")).to_have_class("active")
    page.fill("#diff-form input[name=a]", runs.forked.session_id)
    page.fill("#diff-form input[name=b]", runs.other.session_id)
    page.click("#diff-form button[type=submit]")
    expect(page.locator(".session-divergence")).to_contain_text("is only in A")
    expect(page.locator(".diff-pair")).to_have_count(1)
    expect(page.locator(".only-in-a")).to_contain_text(runs.fork)
    page.fill("#diff-form input[name=b]", f"{runs.other.session_id}:#5")
    page.fill("#diff-form input[name=a]", f"{runs.forked.session_id}:#1")
    page.click("#diff-form button[type=submit]")
    expect(page.locator(".error-banner")).to_contain_text("404: no loop '#5'")
    watched.expect_failed_request(404)


def test_the_compare_form_shows_a_ref_holding_bidi_controls_escaped(watched: Watched, runs: Stored) -> None:
    # The form put the id raw in its input, where it read reversed ("run\u202egnp" as
    # "runpng"), the only place of the page not showing the escape.
    session_id = "run\u202egnp"
    with JsonDirStore(runs.directory) as store:
        store.save(record_runs([Run(BASE)], session_id)[0])
    page = watched.page
    page.goto("/#/diff?" + urlencode({"a": session_id, "b": runs.other.session_id}))
    expect(page.locator(".diff-pair")).to_have_count(1)
    expect(page.locator("#diff-form input[name=a]")).to_have_value("run\\u202egnp")
    page.fill("#diff-form input[name=b]", runs.forked.session_id)
    page.click("#diff-form button[type=submit]")  # a left as shown: the session, not its escape
    page.wait_for_url(lambda url: runs.forked.session_id in url)
    assert "a=run%E2%80%AEgnp&" in page.url, page.url
    expect(page.locator(".diff-pair")).to_have_count(1)
    assert page.locator(".error-banner").count() == 0
