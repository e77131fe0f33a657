"""Where the uplink and the gateway spend their time on each hot path, by two profilers.

    python -m bench.profile_paths ingress [--n 3000] [--top 25] [--in-flight 64]
    python -m bench.profile_paths mcp
    python -m bench.profile_paths gateway
    python -m bench.profile_paths gateway --sampler py-spy [--rate 1000]

The process under test (``run_uplink.py`` or ``run_gateway.py``) is started, warmed up,
driven through ``--n`` requests of the path, and stopped with SIGTERM. Two samplers:

- ``cprofile`` (the default): the process is started through ``serve``, which wraps every
  thread's ``run`` in a ``cProfile.Profile`` (on Python 3.11 a profile sees one thread
  only, and the uplink's event loop runs in a helper thread); it prints the top frames by
  self time over all threads. cProfile charges a fixed cost to every Python call, so code
  made of many small calls looks dearer than it is, and everything runs about twice as
  slowly: read the shares, not the times.
- ``py-spy`` (PyPI): the process runs as it does in production, and py-spy reads its
  threads' Python stacks from outside, ``--rate`` times a second, while the path is
  driven, without pausing it (``--nonblocking``). Only the samples of a thread holding
  the GIL count (``--gil``): py-spy's own idle detection does not work on this VM (the
  loop's ``epoll_wait`` inside uvloop and the writer's queue wait were counted busy), and
  a thread that waits gives the GIL up. So the figures are the interpreter's time, which
  one process can spend on one core at a time; C work done without the GIL (SQLite's
  commit, libuv's socket reads) is not in them. Pausing the process for each sample
  (py-spy's default) counted more time under the GIL than the requests took, and slowed
  them by half; read without a pause, a stack is sometimes read from its innermost frames
  only, and the summary prints how many were read whole. It prints the flame graph's
  widest frames (the share of samples with that frame on the stack), the innermost
  frames (self), and the self share by package; the collapsed stacks are kept for a
  flame graph (``flamegraph.pl`` or speedscope reads them). The sampler takes CPU from a
  2-core machine too: read the shares; the times are the sampled ones.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import re
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.peers import run_loop
from bench.run import PY, REPO, BenchGateway, free_port, peer, wait_ready, ws_url

BODY = {"tool_name": "Bash", "tool_input": {"command": "ls"}}


def serve(out: str, script: str, args: list[str]) -> None:
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread.run = run  # type: ignore[method-assign]

    def clear(_signum: int, _frame: Any) -> None:  # warm-up done: start counting
        for profile in profiles:
            profile.clear()

    signal.signal(signal.SIGUSR2, clear)
    main = cProfile.Profile()
    profiles.append(main)
    sys.argv = [script, *args]
    main.enable()
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    finally:
        main.disable()
        stats = pstats.Stats(main)
        for profile in profiles[1:]:
            # A thread still running, with nothing recorded yet, has nothing to add.
            with contextlib.suppress(TypeError, ValueError):
                stats.add(profile)
        stats.dump_stats(out)


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


class CProfileSampler:
    """cProfile of every thread: the script runs under ``serve``, which writes ``out``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def start(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        return _spawn([PY, "-m", "bench.profile_paths", "serve", str(self.out), script, *args])

    def counting(self, proc: subprocess.Popen[bytes]) -> None:
        """After the warm-up: forget start-up and warm-up, count from here."""
        proc.send_signal(signal.SIGUSR2)
        time.sleep(0.5)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        _stop(proc)

    def report(self, top: int, n: int) -> str:
        return summary(self.out, top, n) + "\n" + by_package(self.out, n)


class PySpySampler:
    """py-spy, attached from outside once the warm-up is done, writing collapsed stacks to
    ``out`` when it is interrupted after the measured requests (the module's docstring says
    why it counts only the samples that hold the GIL)."""

    def __init__(self, out: Path, rate: int) -> None:
        self.out = out
        self.rate = rate
        self.recorder: subprocess.Popen[bytes] | None = None

    def start(self, script: str, *args: str) -> subprocess.Popen[bytes]:
        return _spawn([PY, script, *args])

    def counting(self, proc: subprocess.Popen[bytes]) -> None:
        self.attach(proc.pid)

    def attach(self, pid: int) -> None:
        """Start sampling process ``pid`` (any process of ours, not only one we started)."""
        self.recorder = subprocess.Popen(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--full-filenames",
                "--nolineno",
                "--gil",
                "--nonblocking",
                "--output",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attached, and sampling, before the measured requests start
        if self.recorder.poll() is not None:
            raise RuntimeError(f"py-spy did not start: {self._said()}")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            self.detach()
        finally:
            _stop(proc)

    def detach(self) -> None:
        """Stop sampling; the collapsed stacks are then in ``out``."""
        if self.recorder is not None:
            self.recorder.send_signal(signal.SIGINT)  # py-spy writes its file and ends
            self.recorder.wait(60)
            if not self.out.is_file() or not self.out.stat().st_size:
                raise RuntimeError(f"py-spy wrote no samples: {self._said()}")

    def _said(self) -> str:
        assert self.recorder is not None and self.recorder.stderr is not None
        return " ".join(self.recorder.stderr.read().decode(errors="replace").split())[-400:]

    def report(self, top: int, n: int) -> str:
        return flame_summary(self.out, top, n, self.rate)


Sampler = CProfileSampler | PySpySampler


def py_spy() -> str:
    """The py-spy installed beside this Python (the test extra's), else the one on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.is_file() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("bench.profile_paths: py-spy is not installed (pip install py-spy)")
    return found


async def post_many(url: str, n: int, in_flight: int = 1) -> None:
    import aiohttp

    from bench.paths import aiohttp_rate

    data = json.dumps(BODY).encode()
    connector = aiohttp.TCPConnector(limit=2 * in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        if in_flight > 1:  # the throughput figure's shape: bench.paths' own rate loop
            await aiohttp_rate(session, url, n, in_flight)
            return
        for _ in range(n):
            async with session.post(
                url, data=data, headers={"Content-Type": "application/json"}
            ) as response:
                await response.read()


def ingress(sampler: Sampler, n: int, in_flight: int = 1) -> None:
    with peer("gateway", "--auto", "approve") as gw_port:
        port = free_port()
        proc = sampler.start(
            "run_uplink.py",
            "--upstream-gateway",
            ws_url(gw_port),
            "--log-level",
            "WARNING",
            "--listen",
            f"127.0.0.1:{port}",
        )
        try:
            wait_ready(port)
            run_loop(post_many(f"http://127.0.0.1:{port}/permission", 300, in_flight))
            sampler.counting(proc)
            run_loop(post_many(f"http://127.0.0.1:{port}/permission", n, in_flight))
        finally:
            sampler.stop(proc)


def mcp(sampler: Sampler, n: int) -> None:
    with peer("jsonrpc") as rpc_port:
        gateway = BenchGateway()
        gateway.start()
        proc = sampler.start(
            "run_uplink.py",
            "--upstream-gateway",
            ws_url(gateway.port),
            "--log-level",
            "WARNING",
            "--local-mcp-url",
            f"http://127.0.0.1:{rpc_port}/mcp",
            "--listen",
            "off",
        )
        try:
            if not gateway.identified.wait(30):
                raise RuntimeError("the uplink did not connect")
            gateway.run(gateway.sequential(300))
            sampler.counting(proc)
            gateway.run(gateway.sequential(n, 1000))
        finally:
            sampler.stop(proc)
            gateway.stop()


def gateway(sampler: Sampler, n: int) -> None:
    from bench.gateway_fleet import OPERATOR_TOKEN, TOKEN, round_trips, wait_http

    with tempfile.TemporaryDirectory(prefix="i26-prof-") as tmp:
        port = free_port()
        import os

        os.environ["SLED_GATEWAY_OPERATOR_TOKEN"] = OPERATOR_TOKEN
        proc = sampler.start(
            "run_gateway.py",
            "--listen",
            f"127.0.0.1:{port}",
            "--token",
            TOKEN,
            "--db",
            f"{tmp}/gateway.db",
            "--log-level",
            "WARNING",
        )
        try:
            base = f"http://127.0.0.1:{port}"
            run_loop(wait_http(base))
            url = f"ws://127.0.0.1:{port}/api/sled-uplink?token={TOKEN}"
            # Back to back, as bench.paths measures the round trip: pauses would add the
            # gateway's idle timers to the profile.
            run_loop(round_trips(base, url, 100, pause=None))
            sampler.counting(proc)
            run_loop(round_trips(base, url, n, pause=None))
        finally:
            sampler.stop(proc)


IDLE = ("acquire' of '_thread.lock", "poll' of 'select.epoll", "time.sleep", "select.select")


def summary(out: Path, top: int, n: int) -> str:
    """Top frames by self time, waits left out, as a share of the busy time and µs per request."""
    raw: dict[Any, Any] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    rows = []
    for (filename, line, name), (_cc, calls, tottime, _ct, _callers) in raw.items():
        where = name if filename == "~" else f"{_short(filename)}:{line}({name})"
        if any(idle in where for idle in IDLE):
            continue
        rows.append((tottime, calls, where))
    busy = sum(r[0] for r in rows)
    rows.sort(reverse=True)
    text = io.StringIO()
    text.write(f"busy {busy:.2f} s ({busy / n * 1e6:.0f} µs a request, profiled)\n")
    text.write(f"{'self %':>7} {'µs/req':>7} {'calls/req':>9}  frame\n")
    for tottime, calls, where in rows[:top]:
        text.write(
            f"{100 * tottime / busy:>6.1f}% {tottime / n * 1e6:>7.1f} {calls / n:>9.1f}  {where}\n"
        )
    return text.getvalue()


def by_package(out: Path, n: int) -> str:
    """Self time summed by where it is spent: kernel socket calls, each library, our code."""
    raw: dict[Any, Any] = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    shares: dict[str, float] = {}
    for (filename, _line, name), (_cc, _calls, tottime, _ct, _callers) in raw.items():
        if any(idle in name for idle in IDLE):
            continue
        if filename == "~":
            if "socket" in name and ("send" in name or "recv" in name):
                key = "kernel: socket send/recv"
            elif "sqlite3" in name:
                key = "sqlite3 (C)"
            elif "_thread.lock" in name:
                key = "thread wake-ups (lock release)"
            else:
                key = "C builtins"
        else:
            key = _package(filename)
        shares[key] = shares.get(key, 0.0) + tottime
    busy = sum(shares.values())
    lines = [f"{'self %':>7} {'µs/req':>7}  where"]
    for key, tottime in sorted(shares.items(), key=lambda kv: -kv[1])[:14]:
        lines.append(f"{100 * tottime / busy:>6.1f}% {tottime / n * 1e6:>7.0f}  {key}")
    return "\n".join(lines) + "\n"


def _package(filename: str) -> str:
    """Whose code a file is: a library's (by its top-level name), the stdlib's, or ours."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if "/lib/python3" in filename:
        return "stdlib " + filename.split("/lib/python3", 1)[1].split("/")[1].removesuffix(".py")
    return "ours: " + _short(filename).split("/", 1)[0]


#: A py-spy frame without its line: ``function (filename)``.
_FRAME = re.compile(r"(?P<name>.*) \((?P<file>[^()]*)\)$")


def flame_summary(out: Path, top: int, n: int, rate: int) -> str:
    """py-spy's collapsed stacks read three ways: the flame graph's widest frames (share of
    the samples with the frame anywhere on the stack), the innermost frames (self), and
    the self share by package; with the time under the GIL a request they stand for."""
    wide: dict[str, int] = {}
    inner: dict[str, int] = {}
    packages: dict[str, int] = {}
    busy = whole = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        busy += count
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame)
            name, filename = (match["name"], match["file"]) if match else (frame, "")
            frames.append((f"{_short(filename)}({name})", filename))
        if frames[0][0].endswith(("(Thread._bootstrap)", "(<module>)")):
            whole += count
        for where in {where for where, _ in frames}:
            wide[where] = wide.get(where, 0) + count
        where, filename = frames[-1]
        inner[where] = inner.get(where, 0) + count
        package = _package(filename) if filename else "?"
        packages[package] = packages.get(package, 0) + count
    if not busy:
        raise RuntimeError(f"py-spy recorded no sample holding the GIL in {out}")
    text = io.StringIO()
    text.write(
        f"samples holding the GIL {busy} at {rate}/s: {busy / rate / n * 1e6:.0f} µs under "
        f"the GIL a request (all threads, sampled); collapsed stacks in {out}\n"
        # Read without pausing the process, a stack is sometimes read from its innermost
        # frames only: the innermost shares count every sample, an outer frame's width
        # only the stacks read down to it.
        f"stacks read whole, from the thread's first frame: {100 * whole / busy:.0f} %\n"
    )
    for title, table, rows in (
        ("widest frames (on the stack)", wide, top),
        ("innermost frames (self)", inner, top),
        ("self by package", packages, 14),
    ):
        text.write(f"\n{'share':>7} {'µs/req':>7}  {title}\n")
        for where, count in sorted(table.items(), key=lambda kv: -kv[1])[:rows]:
            text.write(f"{100 * count / busy:>6.1f}% {count / rate / n * 1e6:>7.1f}  {where}\n")
    return text.getvalue()


def _short(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        serve(argv[1], argv[2], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", choices=["ingress", "mcp", "gateway"])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=None, help="keep the profile here")
    parser.add_argument(
        "--in-flight", type=int, default=1, help="ingress only: requests in flight at once"
    )
    parser.add_argument("--sampler", choices=["cprofile", "py-spy"], default="cprofile")
    parser.add_argument("--rate", type=int, default=1000, help="py-spy's samples a second")
    args = parser.parse_args(argv)
    if args.in_flight < 1 or (args.in_flight > 1 and args.path != "ingress"):
        parser.error("--in-flight is at least 1, and only for ingress")
    if args.rate < 1:
        parser.error("--rate is at least 1")
    suffix = "prof" if args.sampler == "cprofile" else "collapsed.txt"
    out = args.out or Path(tempfile.mkdtemp(prefix="i26-prof-")) / f"{args.path}.{suffix}"
    sampler: Sampler = (
        CProfileSampler(out) if args.sampler == "cprofile" else PySpySampler(out, args.rate)
    )
    started = time.perf_counter()
    if args.path == "ingress":
        ingress(sampler, args.n, args.in_flight)
    else:
        {"mcp": mcp, "gateway": gateway}[args.path](sampler, args.n)
    print(f"{args.path}: {args.n} requests in {time.perf_counter() - started:.1f} s; {out}")
    print(sampler.report(args.top, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
