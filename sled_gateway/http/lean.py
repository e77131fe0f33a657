"""A lean path for the hot HTTP route: the decision POST, without Starlette's stack.

Every approval ends in ``POST /api/permissions/{project}/{req_id}``, and on
that round trip Starlette's layers (the error and exception middlewares, the
router trying routes in order, the endpoint wrapper, and a ``send`` wrapper
per layer around each message the answer sends) are work the route never
needs: about 10 µs a request of the 50 to 60 µs its dispatch costs in-process
(``bench/decision_dispatch.py``). :class:`LeanRoute` sits between the request
guard and Starlette:

    RequestGuard (http/guard.py)  every check, for every path, unchanged
      └─ LeanRoute                POST that matches the route's own pattern → its handler
           └─ Starlette           everything else, unchanged

Nothing is checked here: the guard (Host, repeated headers, authentication,
cross-site, role, Origin, Content-Type) has already run, in its order, and the
handler (body cap and deadline, JSON shape, per-project authorization, the
durable commit before the answer, one decision per request) is the route's
own, called with the same Starlette ``Request``. What is left out is only
what that route never uses: the router, the ``HTTPException`` handlers (the
handler raises none) and the per-layer ``send`` wrappers. The match is the
``Route``'s own (:meth:`starlette.routing.Route.matches`), so both paths agree
on which requests are the route's; a handler that raises gets a ``500`` JSON
error, as Starlette's ``ServerErrorMiddleware`` would answer, and the error
goes on to the server, which logs it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Match, Route

from sled_gateway.http.errors import error
from sled_gateway.http.guard import ASGIApp, Receive, Scope, Send


class LeanRoute:
    """ASGI app: one ``Route``'s requests straight to its endpoint, the rest to ``fallback``."""

    def __init__(self, route: Route, fallback: ASGIApp) -> None:
        if route.methods is None or len(route.methods) != 1:
            # One method: a request with another one falls through, and Starlette
            # answers it (405, or the route for that method) as it always did.
            raise ValueError("a lean route serves exactly one method")
        (self.method,) = route.methods
        self.route = route
        self.endpoint = route.endpoint
        # The route's literal head, to pass other paths on without running its pattern.
        self.prefix = route.path.split("{", 1)[0]
        self.fallback = fallback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != self.method
            or not scope["path"].startswith(self.prefix)
        ):
            await self.fallback(scope, receive, send)
            return
        match, child_scope = self.route.matches(scope)
        if match is not Match.FULL:
            await self.fallback(scope, receive, send)
            return
        scope.update(child_scope)
        try:
            response = await self.endpoint(Request(scope, receive, send))
        except Exception:
            # Nothing was sent yet (the endpoint returns its answer): say so in
            # the house's JSON shape, and let the server log the error.
            await error(500, "internal error")(scope, receive, send)
            raise
        await response(scope, receive, send)
