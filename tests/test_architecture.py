"""The shape of the code: what must stay true as it changes.

- ``actors/`` uses only the public API of pykka and websockets: a private
  name of either (a ``_`` import, attribute or overridden method, or one of
  their undocumented internals) is the kind of dependency a minor release
  breaks silently, and some of these guard security (fail-closed) paths.
- ``sled_gateway/`` holds to the same rule for every library it uses, with one
  exception each for uvicorn and nats-py: ``uvicorn_adapter.py`` and
  ``bus/nats_adapter.py`` name each internal they need, and
  ``tests/test_uvicorn_adapter.py`` and ``tests/test_nats_adapter.py`` check
  those uses against the installed library. The slowloris defences both servers share have no public
  hook either: ``actors/http_guard.py`` is their one module, held to the same
  rule.
- No import cycles among the actor modules; ``actors.permissions`` can be
  imported without the WebSocket stack.
- ``protocol/`` stays sans-I/O: it imports no I/O library at all.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import h11
import pykka
import pytest
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
ACTORS = sorted((ROOT / "actors").glob("*.py"))
PROTOCOL = sorted((ROOT / "protocol").glob("*.py"))
LIBRARIES = ("pykka", "websockets")
# Public-looking names that are internals of those libraries (their mailbox,
# websockets' asyncio connection's event hook and send guards).
INTERNALS = {
    "actor_inbox",
    "process_event",
    "send_in_progress",
    "fragmented_send_waiter",
    "paused",
    "recv_messages",
    "drain_waiters",
}
GATEWAY = sorted((ROOT / "sled_gateway").rglob("*.py"))
# The gateway modules allowed past a library's public API: uvicorn's, nats-py's.
ADAPTER_NAMES = {"uvicorn_adapter.py", "nats_adapter.py"}
GATEWAY_CHECKED = [p for p in GATEWAY if p.name not in ADAPTER_NAMES]
GATEWAY_LIBRARIES = (
    "uvicorn",
    "h11",
    "starlette",
    "sse_starlette",
    "websockets",
    "pykka",
    "httpx",
    "httpcore",
    "anyio",
    "mcp",
    "loguru",
    "nio",
    "sqlalchemy",
    "alembic",
    "prometheus_client",
    "nats",
)
# Libraries whose public API is what the top-level package exports (``__all__``):
# their submodules (``uvicorn.protocols...``, ``h11._connection``) are internals.
TOP_LEVEL_ONLY = {"uvicorn": frozenset(uvicorn.__all__), "h11": frozenset(h11.__all__)}
# Public-looking names that are internals of uvicorn's server and protocols.
GATEWAY_INTERNALS = INTERNALS | {
    "server_state",
    "http_protocol_class",
    "ws_protocol_class",
    "loaded_app",
    "startup",
    "main_loop",
    "on_tick",
    "should_exit",
    "servers",
    "force_exit",
    "capture_signals",
    "handle_events",
    "on_response_complete",
    "timeout_keep_alive_task",
}
IO_LIBRARIES = {
    "pykka",
    "websockets",
    "httpx",
    "httpcore",
    "aiohttp",
    "httpx_aiohttp",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "threading",
    "uvicorn",
    "starlette",
    "h11",
    "loguru",
    "prometheus_client",
    "mcp",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_private_names(paths: list[Path]) -> set[str]:
    """Every private name the modules define themselves (methods, attributes, slots)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)  # __slots__ entries
    return {n for n in names if _private(n)}


def private_uses(
    paths: list[Path],
    libraries: tuple[str, ...] = LIBRARIES,
    internals: set[str] = INTERNALS,
    top_level_only: dict[str, frozenset[str]] | None = None,
) -> list[str]:
    """Uses of the ``libraries``' private names in ``paths``, as readable lines.

    ``top_level_only`` maps a library to the names its package exports; any
    other of its modules or attributes is an internal.
    """
    top_level_only = top_level_only or {}
    own = _own_private_names(paths)
    found: list[str] = []
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        # Local names bound to a top-level-only library (``import uvicorn as u``).
        bound = {
            alias.asname or alias.name.split(".")[0]: alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.split(".")[0] in top_level_only
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] in libraries and any(_private(p) for p in parts):
                        found.append(f"{where}:{node.lineno}: import {alias.name}")
                    elif parts[0] in top_level_only and len(parts) > 1:
                        found.append(f"{where}:{node.lineno}: import {alias.name} (internal)")
            elif isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] in libraries:
                    if any(_private(p) for p in parts):
                        found.append(f"{where}:{node.lineno}: from {node.module} import ...")
                    elif parts[0] in top_level_only and len(parts) > 1:
                        found.append(f"{where}:{node.lineno}: from {node.module} (internal)")
                    for alias in node.names:
                        exported = top_level_only.get(parts[0])
                        if _private(alias.name) or (
                            exported is not None and len(parts) == 1 and alias.name not in exported
                        ):
                            found.append(f"{where}:{node.lineno}: {node.module}.{alias.name}")
            elif isinstance(node, ast.Attribute):
                library = bound.get(node.value.id) if isinstance(node.value, ast.Name) else None
                if _private(node.attr) and node.attr not in own:
                    found.append(f"{where}:{node.lineno}: .{node.attr} (not ours)")
                elif node.attr in internals:
                    found.append(f"{where}:{node.lineno}: .{node.attr} (a library internal)")
                elif library is not None and node.attr not in top_level_only[library]:
                    found.append(f"{where}:{node.lineno}: {library}.{node.attr} (internal)")
    return found


def gateway_private_uses(paths: list[Path]) -> list[str]:
    """:func:`private_uses` with the gateway's libraries and their internals."""
    return private_uses(paths, GATEWAY_LIBRARIES, GATEWAY_INTERNALS, TOP_LEVEL_ONLY)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _classes_of(package_paths: list[Path]) -> list[type]:
    classes = []
    for path in package_paths:
        if "migrations" in path.relative_to(ROOT).parts:
            continue  # Alembic's scripts run inside a migration, not on import
        module = importlib.import_module(_module_name(path))
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__ == module.__name__:
                classes.append(value)
    return classes


# ── public APIs only ────────────────────────────────────────────────────────


def test_actors_use_no_private_name_of_pykka_or_websockets() -> None:
    assert private_uses(ACTORS) == []


def test_the_scan_finds_what_it_is_for(tmp_path: Path) -> None:
    """The scan itself must be able to fail: each kind of private use is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import pykka\n"
        "from pykka import _envelope\n"
        "from websockets.asyncio import connection\n"
        "def f(actor, ws):\n"
        "    actor._handle_receive(None)\n"
        "    actor.actor_inbox.get()\n"
        "    return ws.send_in_progress, pykka._threading\n"
    )
    found = private_uses([sample])
    assert len(found) == 5, found
    assert any("_envelope" in f for f in found)
    assert any("_handle_receive" in f for f in found)
    assert any("actor_inbox" in f for f in found)
    assert any("_threading" in f for f in found)
    assert any("send_in_progress" in f for f in found)


def test_no_actor_overrides_a_private_method_of_pykka() -> None:
    library_private = {
        n
        for n in dir(pykka.ThreadingActor)
        if _private(n) and callable(getattr(pykka.Actor, n, None))
    }
    overridden = [
        f"{cls.__name__}.{name}"
        for cls in _classes_of(ACTORS)
        if issubclass(cls, pykka.Actor)
        for name in vars(cls)
        if name in library_private
    ]
    assert overridden == []


def test_no_class_extends_a_websockets_connection() -> None:
    import websockets.asyncio.connection
    import websockets.protocol

    bases = (websockets.asyncio.connection.Connection, websockets.protocol.Protocol)
    extending = [cls.__name__ for cls in _classes_of(ACTORS) if issubclass(cls, bases)]
    assert extending == []


def test_the_gateway_uses_no_private_name_of_a_library() -> None:
    assert GATEWAY_CHECKED, "no gateway modules found"
    assert gateway_private_uses(GATEWAY_CHECKED) == []


def test_the_gateway_scan_finds_what_it_is_for(tmp_path: Path) -> None:
    """Each kind of private use the gateway could make is caught."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import uvicorn\n"
        "import uvicorn.protocols.http.h11_impl\n"
        "from uvicorn import Config, Server\n"
        "from uvicorn.protocols.http.h11_impl import H11Protocol\n"
        "from uvicorn import ServerState\n"
        "from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE\n"
        "from mcp.shared._httpx_utils import create_mcp_http_client\n"
        "from starlette.requests import Request\n"
        "def f(server, protocol):\n"
        "    server.should_exit = True\n"
        "    protocol.server_state.connections.clear()\n"
        "    return uvicorn.protocols, uvicorn.Config\n"
    )
    found = gateway_private_uses([sample])
    assert len(found) == 8, found
    for expected in (
        "import uvicorn.protocols.http.h11_impl (internal)",
        "from uvicorn.protocols.http.h11_impl (internal)",
        "uvicorn.ServerState",
        "from h11._connection import",
        "from mcp.shared._httpx_utils import",
        ".should_exit (a library internal)",
        ".server_state (a library internal)",
        "uvicorn.protocols (internal)",
    ):
        assert any(expected in f for f in found), (expected, found)


@pytest.mark.parametrize("adapter_name", sorted(ADAPTER_NAMES))
def test_each_adapter_is_one_module_naming_what_it_uses(adapter_name: str) -> None:
    (adapter,) = [p for p in GATEWAY if p.name == adapter_name]
    docstring = ast.get_docstring(ast.parse(adapter.read_text())) or ""
    uses = gateway_private_uses([adapter])
    assert uses, "the adapter no longer needs its library's internals: fold it back in"
    for use in uses:
        name = use.split(": ", 1)[1].split(" (")[0].removeprefix("from ").lstrip(".")
        assert name in docstring, f"{use}: not named in the adapter's docstring"


def test_the_shared_http_guard_is_the_actors_module_naming_what_it_uses() -> None:
    """``actors/http_guard.py`` (both servers' deadlines and caps) is where the
    uplink reaches into uvicorn's protocol, and it names each internal it uses;
    the ingress only asks its server to stop (``should_exit``)."""
    guard = ROOT / "actors" / "http_guard.py"
    docstring = ast.get_docstring(ast.parse(guard.read_text())) or ""
    uses = gateway_private_uses([guard])
    assert uses, "the guard no longer needs uvicorn's internals: say so in its docstring"
    for use in uses:
        name = use.split(": ", 1)[1].split(" (")[0].removeprefix("from ").lstrip(".")
        assert name in docstring, f"{use}: not named in the guard's docstring"
    others = [p for p in ACTORS if p.name not in ("http_guard.py", "ingress.py")]
    assert gateway_private_uses(others) == []
    ingress = gateway_private_uses([ROOT / "actors" / "ingress.py"])
    assert [u.split(": ", 1)[1] for u in ingress] == [".should_exit (a library internal)"]


def test_no_gateway_class_extends_a_uvicorn_or_h11_class() -> None:
    extending = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in _classes_of(GATEWAY_CHECKED)
        for base in cls.__mro__[1:]
        if base.__module__.split(".")[0] in TOP_LEVEL_ONLY
    ]
    assert extending == []


# ── imports ─────────────────────────────────────────────────────────────────


def _module_level_imports(path: Path) -> set[str]:
    """``actors.*`` modules imported at module level (TYPE_CHECKING blocks included)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.If):  # if TYPE_CHECKING: ...
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return {m for m in found if m.startswith("actors.")}


def test_actor_modules_import_each_other_without_cycles() -> None:
    graph = {f"actors.{p.stem}": _module_level_imports(p) for p in ACTORS}
    graph["actors.__init__"] = set()  # the package's own re-exports are not a cycle
    cycles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif len(path) < len(graph):
                walk(target, [*path, target])

    for module in graph:
        walk(module, [module])
    assert cycles == []


def test_the_ingress_does_not_import_the_uplink() -> None:
    tree = ast.parse((ROOT / "actors" / "ingress.py").read_text())
    modules = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "actors.system" not in modules


def _loaded_after_import(module: str) -> list[str]:
    code = f"import sys, json; import {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return list(json.loads(out))


def test_importing_the_permission_registry_does_not_load_websockets() -> None:
    loaded = _loaded_after_import("actors.permissions")
    assert "actors.permissions" in loaded
    assert [m for m in loaded if m.split(".")[0] == "websockets"] == []


# ── protocol/ is sans-I/O ───────────────────────────────────────────────────


@pytest.mark.parametrize("module", ["protocol", *(f"protocol.{p.stem}" for p in PROTOCOL)])
def test_protocol_loads_no_io_library(module: str) -> None:
    loaded = {m.split(".")[0] for m in _loaded_after_import(module)}
    assert loaded & IO_LIBRARIES == set()


def test_protocol_source_imports_no_io_library() -> None:
    imported: list[str] = []
    for path in PROTOCOL:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.append(node.module)
    assert sorted({m for m in imported if m.split(".")[0] in IO_LIBRARIES}) == []
