"""Attacks on the gateway's memory, disk and files: one sled flooding it with big
permission requests, and the audit database's file modes.

A real gateway (``run_gateway.py`` as a process where its RSS, its files or its
umask are the point, the library's in-thread one elsewhere) and a raw
``websockets`` client as the sled. Each test fails on a gateway without the
bounds of docs/gateway-security.md ("Bounds") and passes with them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from sled_gateway import Gateway
from sled_gateway.store import AuditEntry, make_store
from tests.test_gateway import TOKEN, T, frame, perm_request, recv, run, sled, wait_state
from tests.test_store import OPERATOR, GatewayProcess

pytestmark = [pytest.mark.security, pytest.mark.timeout(300)]

MiB = 1024 * 1024
DENIED = {"approved": False, "always_allow": False}


def canonical(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def db_bytes(db: Path) -> int:
    return sum(
        os.stat(f"{db}{suffix}").st_size
        for suffix in ("", "-wal", "-shm", "-journal")
        if os.path.exists(f"{db}{suffix}")
    )


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def spawn() -> Iterator[Callable[..., GatewayProcess]]:
    procs: list[GatewayProcess] = []

    def start(*args: str) -> GatewayProcess:
        p = GatewayProcess("--listen", "127.0.0.1:0", *args)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


# -- the flood ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_flood_of_big_requests_is_bounded_in_memory_state_and_disk(
    spawn: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    """1,000 requests of 1 MB each from one sled, with the defaults."""
    db = tmp_path / "data" / "gateway.db"
    gp = spawn("--db", str(db))
    port = gp.port()
    base = f"http://127.0.0.1:{port}"
    count, size = 1000, 1_000_000
    tool_input = {"file_path": "/tmp/f", "content": "a" * size}
    input_bytes = len(canonical(tool_input))
    body = json.dumps({"tool_name": "Write", "tool_input": tool_input})
    numbers: dict[str, Any] = {}

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
        async with connect(url, max_size=None) as ws:
            await ws.send(frame("identity", "identity", {"project": "flood"}))
            await ws.send(perm_request("warm-up"))
            async with httpx.AsyncClient(base_url=base, headers=OPERATOR, timeout=T) as client:
                while not (await client.get("/api/state")).json()["pending"]:
                    await asyncio.sleep(0.05)
                numbers["rss_before_kib"] = rss_kib(gp.proc.pid)
                started = time.monotonic()
                denied = 0

                async def count_denials() -> None:
                    nonlocal denied
                    while True:
                        answer = json.loads(await ws.recv())
                        assert answer["type"] == "perm_response"
                        assert answer["payload"] == DENIED
                        denied += 1

                reader = asyncio.create_task(count_denials())
                for i in range(count):
                    await ws.send(f'{{"type":"perm_request","req_id":"big-{i}","payload":{body}}}')
                # Every request is either pending or denied; wait until the gateway has
                # taken them all in (bounded: a gateway that keeps them all never denies).
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    pending = (await client.get("/api/state?limit=0")).json()["counts"]["pending"]
                    if pending - 1 + denied >= count:
                        break
                    await asyncio.sleep(0.2)
                numbers["flood_s"] = round(time.monotonic() - started, 2)
                numbers["rss_after_kib"] = rss_kib(gp.proc.pid)
                numbers["denied"] = denied
                numbers["pending"] = pending - 1
                took = time.monotonic()
                # A long deadline, so that an unbounded gateway still shows its numbers.
                response = await client.get("/api/state", params={"limit": 100_000}, timeout=120)
                numbers["state_s"] = round(time.monotonic() - took, 3)
                numbers["state_bytes"] = len(response.content)
                state = response.json()
                reader.cancel()
            numbers["shown"] = [
                (p.get("input_truncated"), p.get("input_bytes"))
                for p in state["pending"]
                if p["req_id"] != "warm-up"
            ][:1]
        # The sled drops: its pending requests are withdrawn and audited.

    run_long(scenario())
    with httpx.Client(base_url=base, headers=OPERATOR, timeout=60) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            withdrawn = client.get(
                "/api/audit", params={"decision": "withdrawn", "limit": 500}
            ).json()["entries"]
            if len(withdrawn) >= numbers["pending"] + 1:
                break
            time.sleep(0.2)
        denials = client.get("/api/audit", params={"decision": "deny", "limit": 3}).json()
    numbers["db_bytes"] = db_bytes(db)
    growth_mib = (numbers["rss_after_kib"] - numbers["rss_before_kib"]) / 1024
    print(
        f"\nflood of {count} x {input_bytes} bytes in {numbers['flood_s']} s: "
        f"RSS {numbers['rss_before_kib'] // 1024} -> {numbers['rss_after_kib'] // 1024} MiB "
        f"(+{growth_mib:.0f} MiB); {numbers['pending']} pending, {numbers['denied']} denied; "
        f"/api/state {numbers['state_bytes']} bytes in {numbers['state_s']} s; "
        f"after the drop the database is {numbers['db_bytes'] / MiB:.1f} MiB"
    )
    assert growth_mib < 200, numbers
    assert numbers["state_bytes"] < 2 * MiB, numbers
    assert numbers["db_bytes"] < 32 * MiB, numbers
    # 64 MiB per sled by default: what fits is pending, the rest denied at once.
    warm_up = len(canonical({"command": "ls"}))
    assert numbers["pending"] == (64 * MiB - warm_up) // input_bytes, numbers
    assert numbers["denied"] == count - numbers["pending"], numbers
    assert numbers["shown"] == [(True, input_bytes)], numbers
    # Denied over the cap, and stored as a summary, never in full.
    row = denials["entries"][0]
    assert row["reason"] == "over --max-pending-bytes-per-sled"
    assert row["tool_input"]["truncated"] is True
    assert row["tool_input"]["bytes"] == input_bytes
    assert row["tool_input"]["sha256"] == hashlib.sha256(canonical(tool_input)).hexdigest()
    assert len(row["tool_input"]["head"]) == 2048
    assert {w["tool_input"].get("truncated") for w in withdrawn if w["req_id"] != "warm-up"} == {
        True
    }


def run_long(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 240))


# -- one input, the totals, the frame ------------------------------------------------------


def test_an_input_over_max_input_bytes_is_denied_at_once_and_audited_as_a_summary(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()  # the defaults: 1 MiB per input
    big = {"command": "echo " + "z" * (MiB + 10)}
    small = {"command": "echo " + "y" * (MiB - 100)}

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("big", "Bash", big))
            assert await recv(ws) == {"type": "perm_response", "req_id": "big", "payload": DENIED}
            await ws.send(perm_request("small", "Bash", small))
            await wait_state(gw, lambda s: {p["req_id"] for p in s["pending"]} == {"small"})

    run(scenario())
    (row,) = gw.audit(decision="deny")
    assert row["req_id"] == "big"
    assert row["reason"] == "over --max-input-bytes"
    assert row["by"] == "limit"
    assert row["tool_input"] == {
        "truncated": True,
        "bytes": len(canonical(big)),
        "sha256": hashlib.sha256(canonical(big)).hexdigest(),
        "head": canonical(big)[:2048].decode(),
    }


def test_the_pending_bytes_of_every_sled_together_are_capped(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway(
        max_input_bytes=100_000, max_pending_bytes_per_sled=250_000, max_pending_bytes=300_000
    )
    item = {"command": "x" * 99_000}

    async def scenario() -> None:
        async with sled(gw, "a") as a, sled(gw, "b") as b:
            for i in range(3):
                await a.send(perm_request(f"a{i}", "Bash", item))
            # The third is over a's own cap (250,000).
            assert (await recv(a))["req_id"] == "a2"
            await b.send(perm_request("b0", "Bash", item))
            await wait_state(gw, lambda s: s["counts"]["pending"] == 3)
            # a holds ~198,000 and b ~99,000: the next one anywhere is over the total.
            await b.send(perm_request("b1", "Bash", item))
            assert await recv(b) == {"type": "perm_response", "req_id": "b1", "payload": DENIED}

    run(scenario())
    reasons = {r["req_id"]: r["reason"] for r in gw.audit(decision="deny")}
    assert reasons == {
        "a2": "over --max-pending-bytes-per-sled",
        "b1": "over --max-pending-bytes",
    }


def test_decided_and_withdrawn_requests_give_their_bytes_back(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway(max_input_bytes=100_000, max_pending_bytes=250_000)
    item = {"command": "x" * 99_000}

    async def fill(ws: Any, *req_ids: str) -> None:
        for req_id in req_ids:
            await ws.send(perm_request(req_id, "Bash", item))
        await wait_state(gw, lambda s: set(req_ids) <= {p["req_id"] for p in s["pending"]})

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await fill(ws, "r0", "r1")
        await wait_state(gw, lambda s: not s["pending"])  # withdrawn
        async with sled(gw, "p") as ws:
            await fill(ws, "r2", "r3")
            await asyncio.to_thread(gw.decide, "p", "r2", "deny")
            assert (await recv(ws))["req_id"] == "r2"
            await fill(ws, "r4")

    run(scenario())
    assert [r["req_id"] for r in gw.audit(decision="deny")] == ["r2"]


def test_a_frame_over_max_frame_bytes_closes_the_sled_with_1009(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway(max_input_bytes=64 * 1024, max_frame_bytes=256 * 1024)

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("huge", "Bash", {"command": "x" * (300 * 1024)}))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), T)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    run(scenario())
    assert gw.state()["pending"] == []


def test_a_max_frame_bytes_too_small_for_one_input_is_refused() -> None:
    from protocol import ConfigError

    with pytest.raises(ConfigError) as raised:
        Gateway(max_input_bytes=MiB, max_frame_bytes=MiB)
    assert raised.value.option == "--max-frame-bytes"


# -- /api/state and the audit rows of requests nobody decided ---------------------------------


def test_api_state_shows_a_big_pending_input_as_its_summary(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()
    big = {"command": "b" * 100_000}

    async def scenario() -> httpx.Response:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("small"))
            await ws.send(perm_request("big", "Bash", big))
            await wait_state(gw, lambda s: len(s["pending"]) == 2)
            async with httpx.AsyncClient(
                base_url=gw.http_url, headers=gw.api_headers(), timeout=T
            ) as client:
                return await client.get("/api/state")

    response = run(scenario())
    shown = {p["req_id"]: p for p in response.json()["pending"]}
    assert shown["small"]["tool_input"] == {"command": "ls"}
    assert shown["small"]["input_truncated"] is False
    assert shown["small"]["input_bytes"] == len(canonical({"command": "ls"}))
    assert shown["big"]["input_truncated"] is True
    assert shown["big"]["input_bytes"] == len(canonical(big))
    assert shown["big"]["tool_input"]["sha256"] == hashlib.sha256(canonical(big)).hexdigest()
    assert len(response.content) < 10_000


def test_withdrawn_and_invalid_big_inputs_are_audited_as_summaries_decided_ones_whole(
    make_reference_gateway: Callable[..., Gateway],
) -> None:
    gw = make_reference_gateway()
    big = {"command": "w" * 50_000}

    async def scenario() -> None:
        async with connect(gw.url_for_sleds()) as early:
            # Before identity: invalid, denied at once.
            await early.send(perm_request("early", "Bash", big))
            assert (await recv(early))["req_id"] == "early"
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("decided", "Bash", big))
            await ws.send(perm_request("left", "Bash", big))
            await wait_state(gw, lambda s: len(s["pending"]) == 2)
            await asyncio.to_thread(gw.decide, "p", "decided", "deny")
            assert (await recv(ws))["req_id"] == "decided"

    run(scenario())
    deadline = time.monotonic() + T
    while len(rows := gw.audit()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)  # the withdrawn row is queued without being awaited
    by_id = {r["req_id"]: r for r in rows}
    assert by_id["decided"]["tool_input"] == big
    for req_id in ("early", "left"):
        assert by_id[req_id]["tool_input"]["truncated"] is True, req_id
        assert by_id[req_id]["tool_input"]["bytes"] == len(canonical(big))


# -- retention ----------------------------------------------------------------------------


def test_audit_retention_is_on_by_default_and_purges(
    spawn: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    db = tmp_path / "gateway.db"
    store = make_store(db).open()
    now = time.time()
    old = now - 91 * 86400
    for req_id, at in (("old", old), ("fresh", now)):
        entry = AuditEntry("p", 1, req_id, "Bash", {}, "approve", "console", None, at, at)
        store.record_later(entry).result(T)
    store.close()
    gp = spawn("--db", str(db))
    port = gp.port()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=OPERATOR, timeout=T) as c:
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            kept = [e["req_id"] for e in c.get("/api/audit").json()["entries"]]
            if kept == ["fresh"]:
                break
            time.sleep(0.05)
    assert kept == ["fresh"]
    assert "audit kept 90 days" in gp.out["stderr"]


def test_the_audit_stays_under_its_size_cap(
    make_reference_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    db = tmp_path / "gateway.db"
    gw = make_reference_gateway(db=db, audit_max_bytes=MiB, max_pending_per_sled=1)
    item = {"command": "c" * 4000}  # a refused request's row keeps it whole (under 4 KiB)
    count = 2000

    async def scenario() -> None:
        async with sled(gw, "p") as ws:
            await ws.send(perm_request("held"))
            await wait_state(gw, lambda s: len(s["pending"]) == 1)
            for i in range(count):
                await ws.send(perm_request(f"r{i}", "Bash", item))
            for _ in range(count):
                assert (await recv(ws))["payload"] == DENIED

    run(scenario())
    gw.stop()
    size = os.stat(db).st_size
    with sqlite3.connect(db) as conn:
        kept = {row[0] for row in conn.execute("SELECT req_id FROM audit")}
    conn.close()
    print(f"\n{count} rows of 4 KB under a 1 MiB cap: {size} bytes on disk, {len(kept)} rows kept")
    assert size < 2 * MiB
    assert f"r{count - 1}" in kept
    assert "r0" not in kept
    assert 150 < len(kept) < count


# -- private files ------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_the_store_folder_and_files_are_private_whatever_the_umask(
    spawn: Callable[..., GatewayProcess], tmp_path: Path, umask: int
) -> None:
    folder = tmp_path / "share" / "sled-gateway"
    db = folder / "gateway.db"
    previous = os.umask(umask)  # the gateway process inherits it
    try:
        gp = spawn("--db", str(db))
    finally:
        os.umask(previous)
    port = gp.port()

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
        async with connect(url) as ws:
            await ws.send(frame("identity", "identity", {"project": "p"}))
            await ws.send(perm_request("r1"))
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", headers=OPERATOR, timeout=T
            ) as client:
                while not (await client.get("/api/state")).json()["pending"]:
                    await asyncio.sleep(0.05)
                decided = await client.post(
                    "/api/permissions/p/r1",
                    json={"decision": "deny"},
                    headers={"Content-Type": "application/json"},
                )
                assert decided.status_code == 200, decided.text

    run(scenario())
    found = {
        str(path.relative_to(tmp_path)): oct(mode(path))
        for path in (tmp_path / "share", folder, *sorted(folder.iterdir()))
    }
    print(f"\nunder umask {umask:04o}: {found}")
    assert {f"share/sled-gateway/gateway.db{s}" for s in ("-wal", "-shm")} <= set(found)
    assert found == {
        name: oct(0o700 if not name.startswith("share/sled-gateway/gateway") else 0o600)
        for name in found
    }


def test_an_existing_database_others_can_read_is_named_in_a_warning(
    spawn: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    db = tmp_path / "gateway.db"
    make_store(db).open().close()
    os.chmod(db, 0o644)
    gp = spawn("--db", str(db))
    gp.port()
    line = gp.wait_for(r"[^\n]*gateway\.db is mode 0644[^\n]*").group(0)
    assert "WARNING" in line
    assert f"chmod 600 '{db}'" in line
    assert mode(db) == 0o644  # the user's file: named, not changed
