"""report.html in a real headless Chromium: every plot decodes, nothing errs, captions stay text.

Chromium is driven over the Chrome DevTools Protocol (a websocket from aiohttp,
already a dependency): no webdriver, no browser download. Debian's ``chromium``
package is required; without it the test skips locally and fails under CI
(``CI`` set), where ``.ci/run`` installs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SCRIPT_CAPTION

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
START_TIMEOUT_S = 30.0  # a cold Chromium on a busy 2-core machine takes a few seconds
LOAD_TIMEOUT_S = 30.0


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    msg = "no headless Chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + "; CI must install it (.ci/run does)")
    pytest.skip(msg)


class Chromium:
    """A headless Chromium process and one page driven over the DevTools Protocol."""

    def __init__(self, binary: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="curate-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{binary} did not open a DevTools port within {START_TIMEOUT_S}s")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def load(self, url: str, probe: str) -> tuple[Any, list[str]]:
        """Open ``url``, wait for its load event, evaluate ``probe``; return (its value, error messages)."""
        return asyncio.run(self._load(url, probe))

    async def _load(self, url: str, probe: str) -> tuple[Any, list[str]]:
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = _Session(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await cdp.call(f"{domain}.enable")
                loaded = cdp.wait_for("Page.loadEventFired")
                nav = await cdp.call("Page.navigate", url=url)
                if nav.get("errorText"):
                    cdp.errors.append(f"navigation: {nav['errorText']}")
                await asyncio.wait_for(loaded, LOAD_TIMEOUT_S)
                result = await cdp.call("Runtime.evaluate", expression=probe, returnByValue=True, awaitPromise=True)
                await asyncio.sleep(0.2)  # let late console/log events arrive
                return result["result"].get("value"), cdp.errors


class _Session:
    """Request/response matching and event collection on one CDP websocket."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future] = {}
        self.waiters: dict[str, asyncio.Future] = {}
        self.errors: list[str] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        return await asyncio.wait_for(fut, LOAD_TIMEOUT_S)

    def wait_for(self, event: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[event] = fut
        return fut

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"])
                if "error" in data:
                    fut.set_exception(RuntimeError(f"CDP error: {data['error']}"))
                else:
                    fut.set_result(data.get("result", {}))
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                          for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                self.errors.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
            if method in self.waiters and not self.waiters[method].done():
                self.waiters[method].set_result(params)


PROBE = """(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return {
    images: imgs.map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                            thumb: i.classList.contains('thumb')})),
    scripts: document.scripts.length,
    captions: Array.from(document.querySelectorAll('td.caption')).map(td => td.textContent),
    title: document.title,
  };
})()"""


@pytest.fixture(scope="module")
def chromium():
    browser = Chromium(_browser())
    yield browser
    browser.close()


GALLERY_PROBE = """(async () => {
  const thumbs = Array.from(document.querySelectorAll('.tile img.thumb'));
  await Promise.all(thumbs.map(i => i.decode().catch(() => null)));
  const tiles = Array.from(document.querySelectorAll('section.gallery .tile'));
  return {
    groups: Array.from(document.querySelectorAll('section.gallery h3')).map(h => h.textContent),
    thumbs: thumbs.map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight,
                              shown: i.getBoundingClientRect().width})),
    tiles: tiles.length,
    pairs: document.querySelectorAll('.tile.pair img.thumb').length,
    captions: tiles.map(t => (t.querySelector('.caption') || {}).textContent),
    markup_in_text: document.querySelectorAll('.tile .caption *, .tile .url *, .tile .key *').length,
    scripts: document.scripts.length,
  };
})()"""


def test_report_renders_every_plot_without_errors(known_run, chromium):
    report = known_run.output / "report.html"
    page, errors = chromium.load(report.as_uri(), PROBE)
    assert errors == []
    plots = [i for i in page["images"] if not i["thumb"]]
    assert len(plots) >= 10
    for img in plots:
        assert img["complete"] and img["w"] > 100 and img["h"] > 100, img
    assert page["scripts"] == 0
    assert SCRIPT_CAPTION in page["captions"]  # shown as text, not run
    assert page["title"].startswith("curate report")


def test_gallery_thumbnails_render_and_captions_stay_text(known_run, chromium):
    """The gallery: every thumbnail decodes at <= 96 px, each dedup copy sits beside its original,
    and the caption holding <script> is text in its tile, with no element (or script) made of it."""
    from conftest import CLEAN, DUPES, FOREIGN, SHORT, TINY

    page, errors = chromium.load((known_run.output / "report.html").as_uri(), GALLERY_PROBE)
    assert errors == []
    assert any(g.startswith("caption_length: caption_too_few_words") for g in page["groups"])
    assert any(g.startswith("dedup_exact: duplicate:exact_image") for g in page["groups"])
    assert page["tiles"] == SHORT + TINY + FOREIGN + DUPES + min(16, CLEAN)
    assert len(page["thumbs"]) == page["tiles"] + DUPES and page["pairs"] == 2 * DUPES
    for img in page["thumbs"]:
        assert img["complete"] and 0 < img["w"] <= 96 and 0 < img["h"] <= 96 and img["shown"] > 0, img
    assert SCRIPT_CAPTION in page["captions"]
    assert page["markup_in_text"] == 0 and page["scripts"] == 0


def test_the_check_sees_a_broken_plot_and_a_console_error(chromium, tmp_path):
    """The harness itself: a page with an undecodable image and a failing script is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                   '<img src="data:image/png;base64,AAAA" alt="broken">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    page, errors = chromium.load(bad.as_uri(), PROBE)
    assert page["images"][0]["w"] == 0
    assert any("boom" in e for e in errors) and any("exception" in e for e in errors)
