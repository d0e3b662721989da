"""The playground: one static page (HTML, CSS, JS) that drives the public API from a browser.

It is a client like any other: it calls `/v1/*` with the key the user typed, so it grants
nothing that curl would not. Its documents carry a strict Content-Security-Policy (no inline
script or style, nothing from another origin), and it stays out of the OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from app.errors import NotFound

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"

# blob: for images fetched with the key (an <img src> cannot send an Authorization header).
CONTENT_SECURITY_POLICY: Final = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_DOCUMENT_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
# The only files served, with their types: a fixed map, so no path from the URL reaches the disk.
_ASSETS: Final = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/playground")
def playground() -> Response:
    """The playground page."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers=_DOCUMENT_HEADERS,
    )


@router.get("/playground/{asset}")
def playground_asset(asset: str) -> Response:
    """The page's script and style sheet."""
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise NotFound("no such route")
    return FileResponse(
        STATIC_DIR / asset,
        media_type=media_type,
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
    )
