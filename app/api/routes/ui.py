"""GET /ui: the skill explorer, a static page shipped inside the package (app/ui/) that uses only
the public HTTP API. Served with a strict Content-Security-Policy: scripts, styles and data come
from this origin only, nothing inline, nothing fetched from elsewhere."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from app.api.errors import NotFound

UI_DIR = Path(__file__).resolve().parents[2] / "ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): an upgraded server never serves a stale mix of modules
}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}

router = APIRouter(tags=["ui"], include_in_schema=False)


@router.get("/ui")
def ui_index() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type=TYPES[".html"], headers=HEADERS)


@router.get("/ui/")
def ui_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


@router.get("/ui/{name}")
def ui_asset(name: str) -> FileResponse:
    """A file of the page (flat folder: no subpaths, so nothing outside app/ui/ can be named)."""
    path = UI_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in TYPES or not path.is_file():
        raise NotFound(f"no UI file {name!r}", type="not_found")
    return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)
