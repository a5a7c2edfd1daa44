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
# axe-core (the npm package) for the accessibility checks: the repository's node_modules (make system-deps runs
# `npm install`), else a global install
_ROOT = Path(__file__).resolve().parent.parent
AXE = next((p for p in (_ROOT / "node_modules/axe-core/axe.min.js", Path("/usr/lib/node_modules/axe-core/axe.min.js"),
                        Path("/usr/local/lib/node_modules/axe-core/axe.min.js")) if p.is_file()), None)
AXE_IMPACTS = ("serious", "critical")  # the violations a page must not have
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
    accessibility: List[str] = field(default_factory=list)  # axe-core's serious and critical violations


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


def axe_violations(page) -> List[str]:
    """Run axe-core in the loaded page: 'rule (impact): n elements: selectors' for each serious or critical
    violation (WCAG 2 A/AA and best-practice rules)."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, targets: v.nodes.map(n => n.target.join(' '))}));
    }""")
    return [f"{v['id']} ({v['impact']}): {len(v['targets'])} elements: {', '.join(v['targets'][:5])}"
            for v in result if v["impact"] in AXE_IMPACTS]


def open_page(html: Path, screenshot: Path | None = None, allowed_root: Path | None = None) -> PageCheck:
    """Load `html` from disk, scroll through it, load every image, run axe-core (where installed), and report what
    went wrong. Requests may go to `allowed_root` (default: the folder above the page's, a run folder)."""
    html = html.resolve()
    allowed = (allowed_root or html.parent.parent).resolve().as_uri()  # a run folder: report/ and its results/
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
        if AXE is not None:
            check.accessibility = axe_violations(page)
        if screenshot is not None:
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(screenshot), full_page=False)
    return check
