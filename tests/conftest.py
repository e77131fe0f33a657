"""Shared fixtures: a real test gateway, fast-configured uplinks, and cleanup.

Timeouts scale with ``SLED_TEST_TIME_FACTOR`` (default 1) for slow machines.
Every test ends with every pykka actor stopped.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors import Uplink, UplinkConfig
from actors.logsetup import configure_logging
from sled_gateway import Gateway as ReferenceGateway
from tests.pg import pg_url, postgres  # noqa: F401  (fixtures for every test file)
from tests.support import proc
from tests.support.browser import browser, page  # noqa: F401  (the browser tests' fixtures)
from tests.support.claude import Decider
from tests.support.gateway import Gateway

TIME_FACTOR = float(os.environ.get("SLED_TEST_TIME_FACTOR", "1"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report shows what each process it started logged: a gateway that
    stopped answering says why only there (its log is otherwise read by nobody)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for process in proc.STARTED:
            tail = process.out["stderr"][-proc.REPORTED_TAIL :]
            argv = " ".join(Path(str(a)).name for a in process.proc.args[:2])
            report.sections.append((f"stderr of {argv} (pid {process.proc.pid})", tail))
    if call.when == "teardown":
        # One still running belongs to a wider fixture (a module's cluster): kept, so a
        # later test of that module that fails shows its log too.
        proc.STARTED[:] = [p for p in proc.STARTED if p.proc.poll() is None]


def scaled(seconds: float) -> float:
    """A timeout in seconds, scaled for slow machines."""
    return seconds * TIME_FACTOR


def eventually(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (returned) or the scaled timeout fails the test."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {scaled(timeout):.1f}s")
        time.sleep(0.002)


def closed_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


FAST = {
    "heartbeat_interval": 10.0,
    "backoff_initial": 0.05,
    "backoff_max": 0.5,
    "backoff_reset_after": 30.0,
    "permission_timeout": 30.0,
    "open_timeout": 2.0,
}


@pytest.fixture(autouse=True)
def _logging() -> None:
    configure_logging(os.environ.get("SLED_TEST_LOG_LEVEL", "DEBUG"))


@pytest.fixture(autouse=True)
def _private_data_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run_gateway.py keeps its database in $XDG_DATA_HOME: each test gets its
    # own, so no test reads another's audit or rules, nor the user's real one.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=5)


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    with Gateway() as gw:
        yield gw


REFERENCE_TOKEN = "s3cret-t0ken"


@pytest.fixture
def make_reference_gateway() -> Iterator[Callable[..., ReferenceGateway]]:
    """``make_reference_gateway(**kwargs)`` → a started reference gateway
    (``sled_gateway/``; token ``REFERENCE_TOKEN`` unless given), stopped after the test."""
    made: list[ReferenceGateway] = []

    def make(**kwargs: Any) -> ReferenceGateway:
        kwargs.setdefault("token", REFERENCE_TOKEN)
        gw = ReferenceGateway(**kwargs).start()
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


@pytest.fixture
def make_uplink() -> Iterator[Callable[..., Uplink]]:
    """``make_uplink(url, **config)`` → a started Uplink, stopped after the test."""
    started: list[Uplink] = []

    def make(url: str, **overrides: Any) -> Uplink:
        settings: dict[str, Any] = {"project": "test-proj", **FAST, **overrides}
        uplink = Uplink(UplinkConfig(upstream_url=url, **settings)).start()
        started.append(uplink)
        return uplink

    yield make
    for uplink in started:
        uplink.stop()


def non_daemon_threads() -> set[str]:
    return {
        t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()
    }


@pytest.fixture
def decider(gw: Any) -> Iterator[Callable[..., Decider]]:
    """``decider(decision, delay=0)`` → a Claude Code test's :class:`Decider` on the
    module's gateway fixture ``gw``, stopped after the test."""
    made: list[Decider] = []

    def make(decision: str | None, delay: float = 0.0) -> Decider:
        made.append(Decider(gw, decision, delay))
        return made[-1]

    yield make
    for one in made:
        one.stop()
