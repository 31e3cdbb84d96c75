"""The playground page at `GET /`: plain HTML, CSS and JavaScript shipped in the package.

The page calls only the public API (`/v1/models`, `/v1/generations`) from the browser, with the
API key typed into it, so it needs no route or permission of its own.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"


def install(app: FastAPI) -> None:
    """Serve the page at `/` and its files under `/static/`."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
