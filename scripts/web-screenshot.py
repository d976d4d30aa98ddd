"""The README's screenshot of the chat page: a question typed, its answer streamed, then the cloud-only rerun (after
an unseen warm-up request in each mode: the first request of a process pays its allocations).

    tandem demo --web --port 8001 &
    python scripts/web-screenshot.py http://127.0.0.1:8001 docs/web-ui.png
"""

from __future__ import annotations

import sys

import httpx
from playwright.sync_api import sync_playwright

QUESTION = "Why is the sky blue? Answer in two sentences."


def main(url: str, out: str, chromium: str = "/usr/bin/chromium") -> None:
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    for mode in ("spec", "cloud"):
        httpx.post(url + "/v1/chat/completions", headers={"x-tandem-mode": mode}, timeout=600, json={
            "model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
        page.goto(url + "/")
        page.wait_for_selector("#status:has-text('Connected')")
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
        page.wait_for_selector(".run[data-state=done]", timeout=600_000)
        page.get_by_role("button", name="Rerun cloud-only and compare").click()
        page.wait_for_selector(".speedup[data-speedup]", timeout=600_000)
        page.screenshot(path=out, full_page=True)
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
