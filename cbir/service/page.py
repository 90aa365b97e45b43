"""The web page: static HTML, CSS and JavaScript served by the app itself (no build step, nothing
fetched from elsewhere, so it works offline); it calls the same HTTP API as any other client."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PAGE = Path(__file__).with_name("static")
# The page loads only its own files; thumbnails arrive as blob: URLs (fetched with the token) and
# query previews as data: URLs.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                                      "frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def serve(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(PAGE / "index.html", headers=HEADERS)
