"""Opening report pages in Debian's Chromium through Playwright (never `playwright install`: no browser downloads).

`open_page` records everything a reader's browser would complain about: console errors, page errors, dialogs
(an injected `alert()` would show up here), requests that leave the report folder, and images that failed to load.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@dataclass
class PageCheck:
    console_errors: List[str] = field(default_factory=list)
    page_errors: List[str] = field(default_factory=list)
    dialogs: List[str] = field(default_factory=list)
    outside_requests: List[str] = field(default_factory=list)
    broken_images: List[str] = field(default_factory=list)
    images: int = 0
    missing_anchors: List[str] = field(default_factory=list)
    load_seconds: float = 0.0


def open_page(html: Path, screenshot: Path | None = None) -> PageCheck:
    """Load `html` from disk, scroll through it (lazy images load), and report what went wrong."""
    import time

    from playwright.sync_api import sync_playwright

    html = html.resolve()
    allowed = html.parent.parent.as_uri()  # the run folder: report/ and the results/ it links to
    check = PageCheck()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: check.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: check.page_errors.append(str(e)))
            page.on("dialog", lambda d: (check.dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: check.outside_requests.append(r.url)
                    if not (r.url.startswith(allowed) or r.url.startswith("data:")) else None)
            started = time.perf_counter()
            page.goto(html.as_uri(), wait_until="load")
            check.load_seconds = time.perf_counter() - started
            page.evaluate("""async () => {
                for (let y = 0; y < document.body.scrollHeight; y += 800) { window.scrollTo(0, y);
                  await new Promise(r => setTimeout(r, 20)); }
                await Promise.all(Array.from(document.images).map(img => img.complete ? null :
                  new Promise(r => { img.onload = img.onerror = r; })));
            }""")
            images = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])")
            check.images = len(images)
            check.broken_images = [src for src, width in images if not width]
            check.missing_anchors = page.evaluate("""Array.from(document.querySelectorAll('a[href^="#"]'))
                .map(a => a.getAttribute('href').slice(1)).filter(id => id && !document.getElementById(id))""")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=False)
        finally:
            browser.close()
    return check
