"""``GET /`` and its assets: the browser page in ``web/``.

Only single-segment names with a known type are served, so nothing outside ``web/`` can be
reached and the API's own 404 and 405 answers are untouched (a catch-all mount would turn
``GET /v1/sessions`` into a static-file 404). No build step: the files are served as they are.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

WEB_DIR = Path(__file__).resolve().parents[2] / "web"

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


def routes(directory: Path = WEB_DIR) -> list[BaseRoute]:
    root = directory.resolve()

    async def asset(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        path = root / name
        media_type = MEDIA_TYPES.get(path.suffix)
        if (
            media_type is None
            or name.startswith(".")
            or path.parent != root
            or not await anyio.Path(path).is_file()
        ):
            raise HTTPException(404, f"no page asset {name!r}")
        # Revalidate every time (ETag/Last-Modified make that cheap): the page has no build step
        # and no hashed names, so a cached old module must never mix with a new one.
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return [
        Route("/", asset, methods=["GET", "HEAD"]),
        Route("/{name:str}", asset, methods=["GET", "HEAD"]),
    ]
