"""Sign-in with OpenID Connect against a real OpenID Provider, in real chromium.

The provider is npm ``oidc-provider`` (``scripts/install-oidc-provider.sh``),
started by ``tests/oidc/provider.mjs`` on a free loopback port with its own
login and consent pages (its built-in devInteractions, which take any
password for a known account), one confidential client that must use PKCE,
and two people, alice and bob. The gateway validates what it returns with
Authlib; nothing on the gateway's side is mocked.

The bad ID tokens come from the provider itself: told a "fault", its token
endpoint re-signs the ID token it was about to return with another issuer,
another audience, an expiry in the past, or a key that is not its own, or
returns the previous login's ID token (a replayed nonce), as a rogue provider
or a man in the middle of the token response would.

The attacks on the browser's side: a callback with a wrong or missing state,
a replayed callback, login CSRF (an attacker's callback URL opened in the
victim's browser), session fixation (the session after login is never the
one before), and the provider down (503, people signed in keep working).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from loguru import logger
from websockets.sync.client import connect

from sled_gateway import Gateway
from sled_gateway.auth.oidc import STATE_COOKIE
from sled_gateway.people import Person
from sled_gateway.principal import Channel, Principal, Role
from tests.conftest import closed_port, eventually, scaled
from tests.support import browser as browser_support
from tests.support.proc import WatchedProcess

pytestmark = [pytest.mark.security, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_DIR = ROOT / ".tools" / "oidc-provider"
PROVIDER_SCRIPT = ROOT / "tests" / "oidc" / "provider.mjs"
CLIENT_ID = "sled-gateway"
CLIENT_SECRET = "client-secret-for-tests"
WAIT_MS = int(scaled(20) * 1000)


def _skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is missing: install nodejs and run `bash scripts/install-oidc-provider.sh`"
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        return "npm oidc-provider is not installed: run `bash scripts/install-oidc-provider.sh`"
    return browser_support.skip_reason()


if (why := _skip_reason()) is not None:
    pytest.skip(why, allow_module_level=True)


class Approvers:
    """A test-only Grants: everyone signed in is an approver of every project."""

    def principal_for(self, person: Person, channel: Channel) -> Principal:
        return Principal(person.id, channel, frozenset({Role.APPROVER}))


class Provider:
    """One ``tests/oidc/provider.mjs`` process."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.proc = WatchedProcess(
            ["node", str(PROVIDER_SCRIPT), str(PROVIDER_DIR)],
            cwd=ROOT,
            env=None,
            timeout=scaled(20),
        )
        self.port = int(self.proc.wait_for(r"listening (\d+)", "stdout").group(1))
        self.issuer = f"http://{host}:{self.port}"

    def command(self, command: dict[str, Any], answer: str) -> str:
        self.proc.type(json.dumps(command))
        return self.proc.wait_for(answer + r"[^\n]*\n", "stdout", count=1).group(0)

    def start(self, redirect_uri: str) -> None:
        self.command(
            {
                "issuer": self.issuer,
                "redirect_uri": redirect_uri,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
            "ready",
        )

    def fault(self, name: str | None) -> None:
        marks = self.proc.out["stdout"].count("fault ")
        self.proc.type(json.dumps({"fault": name}))
        self.proc.wait_for(r"fault [^\n]*\n", "stdout", count=marks + 1)

    def kill(self) -> None:
        self.proc.kill()


def start_pair(
    tmp_path: Path, provider_host: str = "127.0.0.1", **gateway: Any
) -> tuple[Provider, Gateway]:
    """A provider, and a gateway signing people in with it (the client registered
    with the gateway's own callback URL)."""
    provider = Provider(provider_host)
    secret = tmp_path / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    gw = Gateway(
        oidc_issuer=provider.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret_file=str(secret),
        **gateway,
    ).start()
    provider.start(gw.http_url + "/auth/callback")
    return provider, gw


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Provider, Gateway]]:
    # This module's tests start a login every second or so, all from 127.0.0.1.
    provider, gw = start_pair(tmp_path_factory.mktemp("oidc"), grants=Approvers(), login_rate=60)
    try:
        yield provider, gw
    finally:
        gw.stop()
        provider.kill()


@pytest.fixture
def idp(pair: tuple[Provider, Gateway]) -> Iterator[Provider]:
    provider = pair[0]
    yield provider
    provider.fault(None)


@pytest.fixture
def gw(pair: tuple[Provider, Gateway]) -> Gateway:
    return pair[1]


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    with browser_support.fresh_page(browser) as fresh:
        yield fresh


def cookie_name(gw: Gateway) -> str:
    return f"sled_gateway_{gw.port}"


def session_of(page: Any, gw: Gateway) -> str | None:
    for cookie in page.context.cookies(gw.http_url):
        if cookie["name"] == cookie_name(gw):
            return str(cookie["value"])
    return None


def api_status(gw: Gateway, session: str, path: str = "/api/state") -> int:
    return httpx.get(gw.http_url + path, cookies={cookie_name(gw): session}).status_code


def sign_in_at_provider(page: Any, who: str) -> None:
    """The provider's own pages: the login form, then the consent page."""
    page.wait_for_selector("input[name=login]", timeout=WAIT_MS)
    page.fill("input[name=login]", who)
    page.fill("input[name=password]", "any password")
    page.click("button[type=submit]")
    page.wait_for_selector("button:has-text('Continue')", timeout=WAIT_MS)
    page.click("button:has-text('Continue')")


def callback_url(gw: Gateway, client: httpx.Client, who: str) -> str:
    """Start a login with ``client`` (its cookies are its browser's) and go through the
    provider's pages as ``who``, stopping before the gateway's callback: its URL."""
    response = client.get(gw.http_url + "/login")
    assert response.status_code == 302, response.text
    response = client.get(response.headers["location"], follow_redirects=True)
    for prompt, form in (("login", {"login": who, "password": "any"}), ("consent", {})):
        action = re.search(r'action="([^"]+)"', response.text)
        assert action is not None, f"no {prompt} form at the provider: {response.text[:500]}"
        response = client.post(
            str(response.url.join(action.group(1))), data={"prompt": prompt, **form}
        )
        while response.status_code in (302, 303):
            location = str(response.url.join(response.headers["location"]))
            if location.startswith(gw.http_url + "/auth/callback"):
                return location
            response = client.get(location)
    raise AssertionError(f"the provider never redirected to the callback: {response.text[:500]}")


def signed_in_cookie(gw: Gateway, client: httpx.Client) -> str | None:
    return client.cookies.get(cookie_name(gw))


# ── the person's way in and out ─────────────────────────────────────────────


def test_alice_signs_in_through_the_providers_pages_and_out_again(
    gw: Gateway, idp: Provider, page: Any
) -> None:
    # The browser holds a session before the login (the operator's, say, or one an
    # attacker planted): the login must not keep it.
    page.goto(gw.console_url())
    before = session_of(page, gw)
    assert before is not None and api_status(gw, before) == 200
    page.wait_for_selector("#signed-in:has-text('the operator')", timeout=WAIT_MS)

    page.click("#sign-in")
    sign_in_at_provider(page, "alice")
    page.wait_for_url(gw.http_url + "/", timeout=WAIT_MS)
    page.wait_for_selector("#signed-in:has-text('Alice Liddell')", timeout=WAIT_MS)

    after = session_of(page, gw)
    assert after is not None and after != before, "the session id was not rotated at login"
    assert api_status(gw, before) == 401, "the pre-login session still works"
    me = httpx.get(gw.http_url + "/api/me", cookies={cookie_name(gw): after}).json()
    assert me["person"]["id"] == "alice@example.test"
    assert me["person"]["issuer"] == idp.issuer and me["person"]["sub"] == "alice"
    assert me["person"]["groups"] == ["approvers", "web-team"]
    assert me["roles"] == ["approver"]  # from the Grants the gateway was given

    page.click("#sign-out")
    page.wait_for_selector("text=sign in", timeout=WAIT_MS)  # the 401 page links to /login
    assert api_status(gw, after) == 401, "the session outlived POST /logout"


def test_a_login_that_starts_at_another_site_still_lands_signed_in(
    browser: Any, tmp_path: Path
) -> None:
    # The provider at http://localhost:P, the gateway at http://127.0.0.1:G: two
    # sites, as a real provider and gateway are. The callback is then a cross-site
    # navigation: the Lax state cookie rides along, and the Strict console cookie
    # is not sent on redirects of that navigation (hence the page that moves on).
    provider, gw = start_pair(tmp_path, provider_host="localhost", grants=Approvers())
    try:
        with browser_support.fresh_page(browser) as page:
            page.goto(gw.http_url + "/login")
            sign_in_at_provider(page, "alice")
            page.wait_for_url(gw.http_url + "/", timeout=WAIT_MS)
            page.wait_for_selector("#signed-in:has-text('Alice Liddell')", timeout=WAIT_MS)
            session = session_of(page, gw)
            assert session is not None and api_status(gw, session) == 200
    finally:
        gw.stop()
        provider.kill()


def test_logout_is_a_state_changing_post_with_the_csrf_rules(gw: Gateway, idp: Provider) -> None:
    with httpx.Client() as browser:
        browser.get(callback_url(gw, browser, "bob"))
        session = signed_in_cookie(gw, browser)
        assert session is not None
    cookies = {cookie_name(gw): session}
    # A post with no Origin on the cookie (browsers always send one), a form post from
    # the page's own origin (no JSON content type), and one from a foreign origin.
    assert httpx.post(gw.http_url + "/logout", cookies=cookies).status_code == 403
    form = {"Origin": gw.http_url, "Content-Type": "application/x-www-form-urlencoded"}
    assert httpx.post(gw.http_url + "/logout", cookies=cookies, headers=form).status_code == 415
    foreign = {"Content-Type": "application/json", "Origin": "http://evil.example"}
    assert httpx.post(gw.http_url + "/logout", cookies=cookies, headers=foreign).status_code == 403
    assert api_status(gw, session) == 200
    own = {"Content-Type": "application/json", "Origin": gw.http_url}
    assert httpx.post(gw.http_url + "/logout", cookies=cookies, headers=own).status_code == 200
    assert api_status(gw, session) == 401


def test_cancelling_at_the_provider_opens_no_session(gw: Gateway, idp: Provider, page: Any) -> None:
    page.goto(gw.http_url + "/login")
    page.wait_for_selector("input[name=login]", timeout=WAIT_MS)
    page.click("text=[ Cancel ]")
    page.wait_for_selector("text=sign-in ended at the identity provider", timeout=WAIT_MS)
    assert "access_denied" in page.content()
    assert session_of(page, gw) is None


# ── attacks on the flow ─────────────────────────────────────────────────────


def test_an_unverified_email_does_not_make_someone_that_person(gw: Gateway, idp: Provider) -> None:
    # mallory's provider profile says alice@example.test, unverified: the access file
    # grants alice's roles by that address, so mallory must not be named by it.
    with httpx.Client() as browser:
        assert browser.get(callback_url(gw, browser, "mallory")).status_code == 200
        me = browser.get(gw.http_url + "/api/me").json()
    assert me["person"]["email"] is None
    assert me["person"]["id"] == me["who"] == f"{idp.issuer}|mallory"
    assert me["person"]["display"] == "Mallory"


@pytest.mark.parametrize("state", ["wrong", "missing"])
def test_a_callback_with_a_wrong_or_missing_state_is_refused(
    gw: Gateway, idp: Provider, state: str
) -> None:
    with httpx.Client() as browser:
        url = callback_url(gw, browser, "alice")
        real = re.search(r"[?&]state=([^&]+)", url)
        assert real is not None
        if state == "wrong":
            forged = url.replace(f"state={real.group(1)}", "state=" + "x" * len(real.group(1)))
        else:
            forged = re.sub(r"[?&]state=[^&]+", "", url)
            forged = forged.replace("/auth/callback&", "/auth/callback?")
        response = browser.get(forged)
        assert response.status_code == 400, response.text
        assert "not started in this browser" in response.json()["error"]
        assert signed_in_cookie(gw, browser) is None
        assert browser.get(gw.http_url + "/api/me").status_code == 401


def test_a_replayed_callback_is_refused(gw: Gateway, idp: Provider) -> None:
    with httpx.Client() as browser:
        url = callback_url(gw, browser, "alice")
        # The state cookie as the browser had it before the callback: an attacker who
        # copied it (and the URL) tries the same callback again.
        name = f"{STATE_COOKIE}_{gw.port}"
        flow_cookies = {name: browser.cookies.get(name) or ""}
        assert flow_cookies[name], "no login state cookie before the callback"
        first = browser.get(url)
        assert first.status_code == 200 and signed_in_cookie(gw, browser) is not None
    with httpx.Client(cookies=flow_cookies) as same_browser:
        again = same_browser.get(url)
        assert again.status_code == 400, again.text
        assert signed_in_cookie(gw, same_browser) is None
    with httpx.Client() as other:
        assert other.get(url).status_code == 400


def test_login_csrf_an_attackers_callback_does_not_sign_the_victim_in(
    gw: Gateway, idp: Provider, page: Any
) -> None:
    # The attacker starts a login as bob in their own browser and stops before the
    # callback; the victim's browser is made to open that URL.
    with httpx.Client() as attacker:
        url = callback_url(gw, attacker, "bob")
    page.goto(gw.console_url())  # the victim has her own (operator) session
    victim_session = session_of(page, gw)
    response = page.goto(url)
    assert response is not None and response.status == 400
    assert "not started in this browser" in page.content()
    assert session_of(page, gw) == victim_session, "the callback touched the victim's session"
    me = httpx.get(gw.http_url + "/api/me", cookies={cookie_name(gw): victim_session or ""}).json()
    assert me["person"] is None and me["who"] == "operator"


@pytest.mark.parametrize("fault", ["issuer", "audience", "signature", "expired", "replay"])
def test_a_bad_id_token_opens_no_session(gw: Gateway, idp: Provider, fault: str) -> None:
    if fault == "replay":
        with httpx.Client() as earlier:  # a good login whose ID token the provider replays
            assert earlier.get(callback_url(gw, earlier, "bob")).status_code == 200
    idp.fault(fault)
    with httpx.Client() as browser:
        response = browser.get(callback_url(gw, browser, "alice"))
        assert response.status_code == 401, response.text
        assert "not valid" in response.json()["error"]
        assert signed_in_cookie(gw, browser) is None
        assert browser.get(gw.http_url + "/api/me").status_code == 401


# ── the provider down ───────────────────────────────────────────────────────


def test_the_provider_down_at_login_is_a_503_and_people_signed_in_keep_working(
    tmp_path: Path,
) -> None:
    provider, gw = start_pair(tmp_path, grants=Approvers())
    try:
        with httpx.Client() as browser:
            browser.get(callback_url(gw, browser, "alice"))
            session = signed_in_cookie(gw, browser)
        assert session is not None
        halfway = httpx.Client()  # bob's login, at its callback when the provider dies
        pending_callback = callback_url(gw, halfway, "bob")
        provider.kill()
        try:
            cut = halfway.get(pending_callback)
        finally:
            halfway.close()
        assert cut.status_code == 503, cut.text
        assert "cannot be reached" in cut.json()["error"]
        eventually(
            lambda: httpx.get(gw.http_url + "/login").status_code == 503, 10, "a 503 at /login"
        )
        down = httpx.get(gw.http_url + "/login")
        assert down.headers["content-type"].startswith("application/json")
        assert "cannot be reached" in down.json()["error"]
        page = httpx.get(gw.http_url + "/login", headers={"Accept": "text/html"})
        assert page.status_code == 503 and "cannot be reached" in page.text
        assert api_status(gw, session) == 200
        assert api_status(gw, session, "/api/me") == 200
    finally:
        gw.stop()
        provider.kill()


def test_a_provider_that_never_answered_is_a_503_not_a_500() -> None:
    issuer = f"http://127.0.0.1:{closed_port()}"
    with Gateway(oidc_issuer=issuer, oidc_client_id=CLIENT_ID) as gw:
        response = httpx.get(gw.http_url + "/login")
        assert response.status_code == 503
        assert "cannot be reached" in response.json()["error"]
        # A callback no login of this client started is refused before the provider
        # is asked anything.
        callback = httpx.get(gw.http_url + "/auth/callback?code=x&state=y")
        assert callback.status_code == 400


def test_without_oidc_the_sign_in_paths_say_so() -> None:
    with Gateway() as plain:
        response = httpx.get(plain.http_url + "/login")
        assert response.status_code == 404
        assert "--oidc-issuer" in response.json()["error"]
        me = httpx.get(plain.http_url + "/api/me", headers=plain.api_headers()).json()
        assert me == {
            "who": "operator",
            "channel": "api",
            "roles": ["admin"],
            "project_roles": [],
            "person": None,
            "sign_in": False,
        }


# ── what a signed-in person may do ──────────────────────────────────────────


def test_a_signed_in_person_decides_with_the_roles_the_grants_give(
    gw: Gateway, idp: Provider
) -> None:
    with httpx.Client() as browser:
        browser.get(callback_url(gw, browser, "alice"))
        session = signed_in_cookie(gw, browser)
    assert session is not None
    with connect(gw.url_for_sleds()) as sled:
        sled.send(json.dumps({"type": "identity", "req_id": "i", "payload": {"project": "web"}}))
        eventually(lambda: any(s["project"] == "web" for s in gw.state()["sleds"]), 10, "sled")
        request = {"tool_name": "Bash", "tool_input": {"command": "npm test"}}
        sled.send(json.dumps({"type": "perm_request", "req_id": "r1", "payload": request}))
        eventually(lambda: gw.is_pending("web", "r1"), 10, "the request pending")
        decided = httpx.post(
            gw.http_url + "/api/permissions/web/r1",
            cookies={cookie_name(gw): session},
            json={"decision": "approve"},
            headers={"Origin": gw.http_url},  # as the console's own fetch sends it
        )
        assert decided.status_code == 200, decided.text
        answer = json.loads(sled.recv(timeout=scaled(10)))
        assert answer["type"] == "perm_response" and answer["req_id"] == "r1"
        assert answer["payload"] == {"approved": True, "always_allow": False}


def test_a_person_no_grant_names_sees_who_they_are_and_nothing_else(tmp_path: Path) -> None:
    provider, gw = start_pair(tmp_path)  # no Grants: the default, NoGrants
    try:
        with httpx.Client() as browser:
            browser.get(callback_url(gw, browser, "bob"))
            cookies = {cookie_name(gw): signed_in_cookie(gw, browser) or ""}
        me = httpx.get(gw.http_url + "/api/me", cookies=cookies)
        assert me.status_code == 200 and me.json()["roles"] == []
        assert httpx.get(gw.http_url + "/", cookies=cookies).status_code == 200
        for path in ("/api/state", "/api/audit", "/api/rules", "/api/events"):
            refused = httpx.get(gw.http_url + path, cookies=cookies)
            assert refused.status_code == 403, path
            assert refused.json()["needs"] == "viewer"
        decision = httpx.post(
            gw.http_url + "/api/permissions/web/r1",
            cookies=cookies,
            json={"decision": "approve"},
            headers={"Origin": gw.http_url},
        )
        assert decision.status_code == 403 and decision.json()["needs"] == "viewer"
        out = httpx.post(
            gw.http_url + "/logout",
            cookies=cookies,
            json=None,
            headers={"Content-Type": "application/json", "Origin": gw.http_url},
        )
        assert out.status_code == 200
        assert httpx.get(gw.http_url + "/api/me", cookies=cookies).status_code == 401
    finally:
        gw.stop()
        provider.kill()


# ── two people, the access file, the audit ─────────────────────────────────


TEAM = """\
[[grant]]
who = "group:web-team"
role = "approver"
projects = ["web-*"]

[[grant]]
who = "bob@example.test"
role = "approver"
projects = ["web-*"]
"""


def test_two_people_sign_in_and_each_decision_names_its_person(
    browser: Any, tmp_path: Path
) -> None:
    """Alice (an approver through her ID token's group) and Bob (by his email) sign in
    through the provider's pages in two browsers; each approves one request from the
    console, and the audit and the console name who did, not "console"."""
    from sled_gateway.access import load_access

    access = tmp_path / "access.toml"
    access.write_text(TEAM)
    provider, gw = start_pair(tmp_path, access=load_access(access))
    try:
        with connect(gw.url_for_sleds()) as sled:
            sled.send(
                json.dumps({"type": "identity", "req_id": "i", "payload": {"project": "web-1"}})
            )
            for req_id in ("by-alice", "by-bob"):
                payload = {"tool_name": "Bash", "tool_input": {"command": f"make {req_id}"}}
                sled.send(
                    json.dumps({"type": "perm_request", "req_id": req_id, "payload": payload})
                )
            eventually(
                lambda: gw.is_pending("web-1", "by-alice") and gw.is_pending("web-1", "by-bob"),
                10,
                "both requests pending",
            )
            for who, name, req_id in (
                ("alice", "Alice Liddell", "by-alice"),
                ("bob", "Bob Builder", "by-bob"),
            ):
                with browser_support.fresh_page(browser) as page:
                    page.goto(gw.http_url + "/login")
                    sign_in_at_provider(page, who)
                    page.wait_for_selector(f"#signed-in:has-text('{name}')", timeout=WAIT_MS)
                    card = f"#pending .card[data-req-id='{req_id}']"
                    page.click(f"{card} button[data-action=approve]", timeout=WAIT_MS)
                    page.wait_for_selector(card, state="detached", timeout=WAIT_MS)
                    # The console's audit log names the person.
                    page.wait_for_selector(
                        f"#audit tbody tr:has-text('{req_id}'):has-text('{who}@example.test')",
                        timeout=WAIT_MS,
                    )
                answer = json.loads(sled.recv(timeout=scaled(10)))
                assert answer["req_id"] == req_id and answer["payload"]["approved"] is True, answer
        with httpx.Client(base_url=gw.http_url, headers=gw.api_headers()) as api:
            rows = {r["req_id"]: r for r in api.get("/api/audit").json()["entries"]}
            alice_rows = api.get("/api/audit", params={"person": "alice@example.test"}).json()
        assert rows["by-alice"]["who"] == "alice@example.test"
        assert rows["by-bob"]["who"] == "bob@example.test"
        assert rows["by-alice"]["channel"] == rows["by-bob"]["channel"] == "console"
        assert [r["req_id"] for r in alice_rows["entries"]] == ["by-alice"]
    finally:
        gw.stop()
        provider.kill()


# ── a flood of GET /login ───────────────────────────────────────────────────

# Low limits, so that a flood is a few dozen requests: a client may start 4 logins
# at once (then one every 30 s) and hold 6 in flight; the store keeps at most 12.
FLOOD_LIMITS = {"login_rate": 2, "max_logins": 12}


def from_address(address: str) -> httpx.Client:
    """An HTTP client whose connections come from ``address`` (another loopback
    address: another client, as the gateway sees it)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address))


def test_a_flood_of_logins_from_one_address_cannot_fail_a_persons_sign_in(
    tmp_path: Path,
) -> None:
    provider, gw = start_pair(tmp_path, grants=Approvers(), **FLOOD_LIMITS)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        with httpx.Client() as alice:
            # Alice is at the provider's pages, about to come back to the gateway.
            pending = callback_url(gw, alice, "alice")
            with from_address("127.0.0.2") as flood:
                answers = [flood.get(gw.http_url + "/login") for _ in range(40)]
            statuses = [a.status_code for a in answers]
            # The burst, then 429s (a token may come back on a slow machine: 30 s).
            assert statuses[:4] == [302] * 4, statuses
            assert statuses.count(302) <= 5 and statuses[-1] == 429, statuses
            refused = answers[-1]
            assert refused.headers["content-type"].startswith("application/json")
            assert "too many sign-ins" in refused.json()["error"]
            assert 1 <= int(refused.headers["retry-after"]) <= 600
            # Another client starts a login as ever.
            with from_address("127.0.0.3") as bob:
                assert bob.get(gw.http_url + "/login").status_code == 302
            done = alice.get(pending)
            assert done.status_code == 200, done.text
            assert signed_in_cookie(gw, alice) is not None
        # One line for the flooding client, not one per refusal.
        flood_lines = [line for line in lines if "127.0.0.2 starts too many" in line]
        assert len(flood_lines) == 1, flood_lines
    finally:
        logger.remove(sink)
        gw.stop()
        provider.kill()


def test_a_flood_of_logins_from_many_addresses_cannot_fail_a_persons_sign_in(
    tmp_path: Path,
) -> None:
    """Together, twenty clients within their limits fill the table of logins in
    flight: new logins are refused (503) rather than Alice's forgotten."""
    provider, gw = start_pair(tmp_path, grants=Approvers(), **FLOOD_LIMITS)
    try:
        with httpx.Client() as alice:
            pending = callback_url(gw, alice, "alice")
            answers = []
            for n in range(10, 30):
                with from_address(f"127.0.0.{n}") as flood:
                    answers += [flood.get(gw.http_url + "/login") for _ in range(2)]
            statuses = [a.status_code for a in answers]
            assert statuses.count(302) == 11, statuses  # the table's 12, with Alice's
            full = answers[-1]
            assert full.status_code == 503, full.text
            assert "too many sign-ins are in progress" in full.json()["error"]
            assert int(full.headers["retry-after"]) >= 1
            done = alice.get(pending)
            assert done.status_code == 200, done.text
            assert signed_in_cookie(gw, alice) is not None
    finally:
        gw.stop()
        provider.kill()
