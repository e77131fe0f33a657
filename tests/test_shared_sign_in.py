"""A sign-in started on one replica ends on another, and the session it opens is
valid on both: two ``run_gateway.py`` replicas, real PostgreSQL, real
nats-server, the real OpenID Provider of ``tests/test_oidc_browser.py``.

Behind a load balancer the browser addresses one host and port; here each
request goes to a replica's own socket with the ``Host`` of replica A (what the
provider redirects back to), as HAProxy passes it on. Before the sign-in state
and its cookie key were shared, B refused A's login ("not started in this
browser"), since it neither knew the state nor could check the cookie.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import nats as nats_support
from tests.support.nats import NatsServer
from tests.test_oidc_browser import CLIENT_ID, CLIENT_SECRET, Provider, callback_url
from tests.test_shared_state import Replica

pytestmark = [pytest.mark.security, pytest.mark.timeout(180)]


@pytest.fixture
def replicas(pg_url: str, tmp_path: Path) -> Iterator[tuple[Provider, Replica, Replica]]:
    """Two ``run_gateway.py`` replicas signing people in with one provider, whose client
    is registered with A's callback URL (the address the browser knows)."""
    nats_support.require()
    nats = NatsServer().start()
    provider = Provider()
    secret = tmp_path / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    sign_in = (
        # A burst of 4 sign-ins on each replica, and 6 in flight per client.
        "--login-rate",
        "2",
        "--oidc-issuer",
        provider.issuer,
        "--oidc-client-id",
        CLIENT_ID,
        "--oidc-client-secret-file",
        str(secret),
    )
    made: list[Replica] = []
    try:
        made.append(Replica(pg_url, nats.url, extra=sign_in))
        made.append(Replica(pg_url, nats.url, extra=sign_in))
        provider.start(made[0].url + "/auth/callback")
        yield provider, made[0], made[1]
    finally:
        for replica in made:
            replica.kill()
        provider.kill()
        nats.cleanup()


class Balancer(httpx.BaseTransport):
    """What the browser sees as replica A's address, sent to whichever replica ``to``
    names (the ``Host`` stays A's), as a load balancer in front of both would."""

    def __init__(self, to: Replica, *, local_address: str | None = None) -> None:
        self.to = to
        self._inner = httpx.HTTPTransport(local_address=local_address)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.url = request.url.copy_with(port=self.to.port)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def browser_behind(a: Replica, balancer: Balancer) -> httpx.Client:
    return httpx.Client(mounts={f"http://127.0.0.1:{a.port}": balancer})


def me(client: httpx.Client, a: Replica) -> httpx.Response:
    return client.get(a.http_url + "/api/me")


def test_a_login_started_on_a_ends_on_b_and_its_session_works_on_both(
    replicas: tuple[Provider, Replica, Replica],
) -> None:
    _provider, a, b = replicas
    balancer = Balancer(a)
    with browser_behind(a, balancer) as browser:
        url = callback_url(a, browser, "alice")  # /login answered by A
        balancer.to = b
        ended = browser.get(url)
        assert ended.status_code == 200, ended.text
        assert browser.cookies.get(f"sled_gateway_{a.port}")
        for replica in (a, b):
            balancer.to = replica
            answer = me(browser, a)
            assert answer.status_code == 200, answer.text
            assert answer.json()["person"]["id"] == "alice@example.test"
        # The state was single-use on every replica: the same callback on A is refused.
        balancer.to = a
        assert browser.get(url).status_code == 400
        balancer.to = b
        out = browser.post(a.http_url + "/logout", headers={"Origin": a.http_url}, json={})
        assert out.status_code == 200, out.text
        session = out.request.headers.get("cookie", "")
    for replica in (b, a):
        gone = httpx.get(
            replica.http_url + "/api/me",
            headers={"Host": f"127.0.0.1:{a.port}", "Cookie": session},
        )
        assert gone.status_code == 401, gone.text


def test_a_login_started_on_b_ends_on_a(replicas: tuple[Provider, Replica, Replica]) -> None:
    _provider, a, b = replicas
    balancer = Balancer(b)
    with browser_behind(a, balancer) as browser:
        url = callback_url(a, browser, "bob")  # /login answered by B
        balancer.to = a
        ended = browser.get(url)
        assert ended.status_code == 200, ended.text
        answer = me(browser, a)
        assert answer.status_code == 200 and answer.json()["person"]["sub"] == "bob"


def test_a_client_spreading_its_sign_ins_over_replicas_gets_one_share(
    replicas: tuple[Provider, Replica, Replica],
) -> None:
    """An anonymous client behind a balancer that sends each request to the next replica
    holds at most its 6 logins in flight over both, not 6 on each (or the burst of 4 on
    each): filling the shared table of logins still takes many clients. The bucket of
    each replica alone let 8 through."""
    _provider, a, b = replicas
    balancer = Balancer(a)
    with browser_behind(a, balancer) as alice:
        pending = callback_url(a, alice, "alice")  # Alice is at the provider's pages
        flood = Balancer(a, local_address="127.0.0.2")
        answers = []
        with browser_behind(a, flood) as client:
            for n in range(16):
                flood.to = (a, b)[n % 2]
                answers.append(client.get(a.http_url + "/login"))
        statuses = [answer.status_code for answer in answers]
        assert statuses.count(302) == 6 and statuses[:6] == [302] * 6, statuses
        assert set(statuses[6:]) == {429}, statuses
        for refused in answers[6:]:
            assert "too many sign-ins" in refused.json()["error"]
            assert 1 <= int(refused.headers["retry-after"]) <= 600
        # Another address starts one, on either replica.
        for replica in (a, b):
            other = Balancer(replica, local_address="127.0.0.3")
            with browser_behind(a, other) as bob:
                assert bob.get(a.http_url + "/login").status_code == 302
        balancer.to = b
        done = alice.get(pending)
        assert done.status_code == 200, done.text
