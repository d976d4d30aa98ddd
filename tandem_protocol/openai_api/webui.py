"""The chat page both servers serve at `/`: static files inside the package (no build step, nothing fetched from
elsewhere), a client of the OpenAI API of the server that serves it. Same origin only: the page adds no cross-origin
access. The edge's page marks where each token came from and compares with cloud-only; the cloud's page is the
target alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

WEB_DIR = Path(__file__).with_name("web")
ASSETS = {"app.js": "text/javascript", "rounds.js": "text/javascript", "style.css": "text/css",
          "favicon.svg": "image/svg+xml"}
# no inline script or style, no other origin: text from the model can never run as code
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def install_web_ui(app: FastAPI, side: Literal["edge", "cloud"]) -> None:
    """`GET /` (the page) and `GET /ui/{asset}`, public and left out of the OpenAPI schema."""
    page = (WEB_DIR / "index.html").read_text("utf-8").replace('data-side="edge"', f'data-side="{side}"')
    assets = {name: (WEB_DIR / name).read_bytes() for name in ASSETS}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404, f"no such file: {name}")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)
