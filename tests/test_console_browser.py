"""The console in a real browser: Debian's chromium, headless, driven by selenium through
chromium-driver, against a real registry and a real receiver.

One browser for the session (a sync session fixture: pytest-trio gives each test a loop of
its own). Selenium's calls block, and the registry under test runs in the test's Trio loop,
so every call to the browser goes through a worker thread. Screenshots of every page are
written under pytest's temporary directory; the path is printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.registry_client import RegistryClient, make_image
from tests.client_tools import unavailable
from tests.conftest import RunningRegistry, start_registry
from tests.sink import HTTPSinkServer
from tests.test_auth import PASSWORDS
from tests.test_console import dead_letters, locked_config
from tests.waiting import eventually

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless chromium for the whole session, or a skip saying why there is none."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            unavailable(f"{path} is not installed (Debian package {package})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (the test extras of pyproject.toml)")
    options = Options()
    options.binary_location = CHROMIUM
    # No sandbox: CI runs as root. /dev/shm may be small in a container.
    flags = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu")
    for argument in (*flags, "--window-size=1280,900"):
        options.add_argument(argument)
    # Its profile under pytest's directory, not the user's.
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except Exception as exc:  # what a browser that cannot start raises varies
        unavailable(f"chromium does not start: {type(exc).__name__}: {exc}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


class Browser:
    """The session's browser, awaited from Trio."""

    def __init__(self, driver: Any, screenshots: Path, capsys: pytest.CaptureFixture[str]):
        self.driver = driver
        self.screenshots = screenshots
        self.capsys = capsys

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(fn, *args)

    async def open(self, url: str) -> None:
        await self._call(self.driver.get, url)

    async def text(self, css: str) -> str:
        """The text of the first element ``css`` selects, read in one step (the live
        refresh may replace it at any moment); "" when there is none."""
        script = "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';"
        return str(await self._call(self.driver.execute_script, script, css)).strip()

    async def wait_text(self, css: str, done: Callable[[str], bool], within: float = 30) -> str:
        return await eventually(lambda: self.text(css), done, within)

    async def click(self, css: str) -> None:
        element = await self._call(self.driver.find_element, "css selector", css)
        await self._call(element.click)

    async def shot(self, name: str) -> None:
        path = self.screenshots / f"{name}.png"
        assert await self._call(self.driver.save_screenshot, str(path))
        with self.capsys.disabled():
            print(f"\nconsole screenshot: {path}")


@pytest.fixture
def browser(chromium: Any, screenshots: Path, capsys: pytest.CaptureFixture[str]) -> Browser:
    return Browser(chromium, screenshots, capsys)


def login_url(registry: RunningRegistry, user: str, path: str, host: str = "127.0.0.1") -> str:
    """``path`` with the user's credentials in the URL: the browser answers the Basic
    challenge with them, and keeps them for the rest of the console's requests."""
    port = registry.url.rsplit(":", 1)[1]
    return f"http://{user}:{PASSWORDS[user]}@{host}:{port}{path}"


async def console_registry(nursery: trio.Nursery, tmp_path: Path, sink: HTTPSinkServer):
    registry = await start_registry(nursery, locked_config(tmp_path, sink.url))
    pusher = httpx.AsyncClient(base_url=registry.url, auth=("alice", PASSWORDS["alice"]))
    return registry, pusher


async def test_a_sink_goes_from_delivering_to_failing_and_back(nursery, tmp_path, sink, browser):
    registry, pusher = await console_registry(nursery, tmp_path, sink)
    state, pending = 'tr[data-sink="audit"] .state', 'tr[data-sink="audit"] .pending'
    async with pusher:
        client = RegistryClient(registry.url, client=pusher)
        await client.push_image("team/app", "v1", make_image((128,)))
        await sink.wait_for(lambda events: len(events) == 1)
        await browser.open(login_url(registry, "carol", "/_registry/ui/"))
        assert await browser.text(state) == "delivering"
        await browser.shot("overview-delivering")

        await sink.stop()
        await client.push_image("team/app", "v2", make_image((128,)))
        # The page refreshes itself: no reload.
        await browser.wait_text(state, lambda s: s == "failing")
        assert await browser.text(pending) == "1"
        assert "ConnectError" in await browser.text('tr[data-sink="audit"] .error')
        await browser.shot("overview-failing")

        await sink.start(nursery)  # the receiver is back, on the same port
        await browser.wait_text(state, lambda s: s == "delivering")
        await browser.wait_text(pending, lambda n: n == "0")
        await sink.wait_for(lambda events: len(events) == 2)
        await browser.shot("overview-recovered")


async def test_replay_a_dead_letter_by_clicking(nursery, tmp_path, sink, browser):
    sink.status = 400
    registry, pusher = await console_registry(nursery, tmp_path, sink)
    async with pusher:
        client = RegistryClient(registry.url, client=pusher)
        await client.push_image("team/app", "v1", make_image((128,)))
        async with httpx.AsyncClient(
            base_url=registry.url, auth=("carol", PASSWORDS["carol"])
        ) as admin:
            (letter,) = await eventually(lambda: dead_letters(admin), lambda d: len(d) == 1)
    await browser.open(login_url(registry, "carol", "/_registry/ui/sink?name=audit"))
    await browser.wait_text(f'tr[data-event="{letter["id"]}"]', lambda t: "HTTP 400" in t)
    await browser.shot("sink-with-a-dead-letter")

    await browser.click(f'tr[data-event="{letter["id"]}"] a')
    assert "team/app" in await browser.text("pre.payload")
    await browser.shot("event")

    sink.status = 200
    await browser.click('form.replay button[name="one"]')
    assert "Replayed 1 dead letter(s)" in await browser.wait_text("#replay-result", bool)
    events = await sink.wait_for(lambda events: any(e["id"] == letter["id"] for e in events))
    assert [e["id"] for e in events] == [letter["id"]]
    await browser.shot("sink-after-replay")

    # The event's page tells its whole path: refused, replayed by carol, delivered.
    event_url = login_url(registry, "carol", f"/_registry/ui/event?id={letter['id']}")

    async def steps() -> str:
        await browser.open(event_url)
        return await browser.text("table.trace tbody")

    path = await eventually(steps, lambda text: "delivered" in text)
    for step in ("committed", "dead", "replayed", "by carol", "delivered"):
        assert step in path, path
    await browser.shot("event-history")


async def test_repository_pages(nursery, tmp_path, sink, browser):
    registry, pusher = await console_registry(nursery, tmp_path, sink)
    async with pusher:
        await RegistryClient(registry.url, client=pusher).push_image(
            "team/app", "v1", make_image((128, 256))
        )
    await browser.open(login_url(registry, "carol", "/_registry/ui/repositories"))
    await browser.shot("repositories")
    await browser.click("ul.repositories a")
    await browser.shot("repository")
    await browser.click("tr.tag a")
    assert (await browser.text("code.pull")).endswith("/team/app:v1")
    assert await browser.text("table.layers") != ""
    await browser.shot("manifest")


async def test_a_non_administrator_is_refused(nursery, tmp_path, sink, browser):
    registry, _ = await console_registry(nursery, tmp_path, sink)
    # Another origin (localhost): the browser holds no login for it yet.
    await browser.open(login_url(registry, "bob", "/_registry/ui/", host="localhost"))
    assert "bob is not an administrator" in await browser.text("body")
    await browser.shot("non-admin-refused")
