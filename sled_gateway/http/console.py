"""The web console: one self-contained HTML page (``sled_gateway/static/console.html``)
and the files that make it an installable app (the web app manifest, the service
worker, the icons).

The page is served behind the operator session, like the API. The app files are
public (``GET``/``HEAD`` only; see :data:`SHELL_PATHS`): they are the same bytes for
every gateway and hold nothing about it, and a browser fetches a manifest and its
icons without credentials (and re-checks a service worker on its own schedule), so
behind the session they would fail to load for reasons a person cannot see.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

# The console's own policy: its inline script and style, its own API, its own service
# worker and manifest, no framing.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'; worker-src 'self'; manifest-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

MANIFEST_PATH = "/manifest.webmanifest"
SERVICE_WORKER_PATH = "/sw.js"
ICON_PATHS = ("/icons/icon-192.png", "/icons/icon-512.png")
#: The app files: public, read-only (the request guard lets GET and HEAD through).
SHELL_PATHS = (MANIFEST_PATH, SERVICE_WORKER_PATH, *ICON_PATHS)

_CONTENT_TYPES = {
    MANIFEST_PATH: "application/manifest+json",
    # A service worker must come as JavaScript, or the browser refuses to register it.
    SERVICE_WORKER_PATH: "text/javascript; charset=utf-8",
    **dict.fromkeys(ICON_PATHS, "image/png"),
}
# The worker is re-checked on every registration, so a new gateway's shell replaces an
# old one's; the rest may be kept a day. The worker's script gets a CSP of its own: it
# fetches only from this origin.
_HEADERS = {
    MANIFEST_PATH: {"Cache-Control": "max-age=86400"},
    SERVICE_WORKER_PATH: {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": "default-src 'none'; connect-src 'self'; frame-ancestors 'none'",
    },
    **{path: {"Cache-Control": "max-age=86400"} for path in ICON_PATHS},
}


def _static(name: str) -> bytes:
    return resources.files("sled_gateway").joinpath("static", *name.split("/")).read_bytes()


def load_console() -> str:
    return _static("console.html").decode("utf-8")


class ConsolePage:
    """``GET /``: the page, read once."""

    def __init__(self) -> None:
        self.html = load_console()

    async def handle(self, request: Request) -> Response:
        return HTMLResponse(
            self.html,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": CONSOLE_CSP},
        )


class ShellFiles:
    """``GET`` the manifest, the service worker and the icons: read once, served as is."""

    def __init__(self) -> None:
        self.files = {path: _static(path.lstrip("/")) for path in SHELL_PATHS}

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        return Response(self.files[path], media_type=_CONTENT_TYPES[path], headers=_HEADERS[path])
