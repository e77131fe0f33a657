"""The web console: one self-contained HTML page (``sled_gateway/static/console.html``)."""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

# The console's own policy: its inline script and style, its own API, no framing.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def load_console() -> str:
    return resources.files("sled_gateway").joinpath("static/console.html").read_text("utf-8")


class ConsolePage:
    """``GET /``: the page, read once."""

    def __init__(self) -> None:
        self.html = load_console()

    async def handle(self, request: Request) -> Response:
        return HTMLResponse(
            self.html,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": CONSOLE_CSP},
        )
