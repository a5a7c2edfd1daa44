"""Opening report pages in Debian's Chromium through Playwright (never `playwright install`: no browser downloads).

`open_page` records everything a reader's browser would complain about: console errors, page errors, dialogs
(an injected `alert()` would show up here), requests that leave the report folder, and images that failed to load.
Every wait is bounded: a page that never finishes loading fails the test with what was missing, it never hangs
the suite (a lazy image scrolled past between two frames on a loaded machine would otherwise wait forever).
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # any single browser step; generous for a shared 2-core machine

# Turn every lazy image eager (the browser starts fetching it now), then wait for each to load or fail, at most
# `timeout` ms; returns the sources still pending so the caller can report them instead of hanging.
_LOAD_ALL_IMAGES = """async (timeout) => {
    const images = Array.from(document.images);
    images.forEach(img => { img.loading = 'eager'; });
    await Promise.race([Promise.all(images.map(img => img.complete ? null : new Promise(r => {
        img.addEventListener('load', r, {once: true}); img.addEventListener('error', r, {once: true}); }))),
        new Promise(r => setTimeout(r, timeout))]);
    return images.filter(img => !img.complete).map(img => img.getAttribute('src'));
}"""


@dataclass
class PageCheck:
    console_errors: List[str] = field(default_factory=list)
    page_errors: List[str] = field(default_factory=list)
    dialogs: List[str] = field(default_factory=list)
    outside_requests: List[str] = field(default_factory=list)
    broken_images: List[str] = field(default_factory=list)
    pending_images: List[str] = field(default_factory=list)  # still loading when the wait ran out
    images: int = 0
    missing_anchors: List[str] = field(default_factory=list)
    load_seconds: float = 0.0


@contextmanager
def chromium_page(viewport=None) -> Iterator["object"]:
    """A fresh headless Chromium page with bounded timeouts; the browser is closed whatever happens."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=TIMEOUT_MS)
        try:
            page = browser.new_page(viewport=viewport or {"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def open_page(html: Path, screenshot: Path | None = None) -> PageCheck:
    """Load `html` from disk, scroll through it, load every image, and report what went wrong."""
    html = html.resolve()
    allowed = html.parent.parent.as_uri()  # the run folder: report/ and the results/ it links to
    check = PageCheck()
    with chromium_page() as page:
        page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: check.page_errors.append(str(e)))
        page.on("dialog", lambda d: (check.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: check.outside_requests.append(r.url)
                if not (r.url.startswith(allowed) or r.url.startswith("data:")) else None)
        started = time.perf_counter()
        page.goto(html.as_uri(), wait_until="load")
        check.load_seconds = time.perf_counter() - started
        page.evaluate("""async () => { for (let y = 0; y < document.body.scrollHeight; y += 800) {
            window.scrollTo(0, y); await new Promise(r => setTimeout(r, 20)); } }""")
        check.pending_images = page.evaluate(_LOAD_ALL_IMAGES, TIMEOUT_MS // 2)
        images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
        check.images = len(images)
        check.broken_images = [src for src, width in images if not width]
        check.missing_anchors = page.evaluate("""Array.from(document.querySelectorAll('a[href^="#"]'))
            .map(a => a.getAttribute('href').slice(1)).filter(id => id && !document.getElementById(id))""")
        if screenshot is not None:
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(screenshot), full_page=False)
    return check
