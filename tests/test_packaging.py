"""Packaging facts a user relies on: one version everywhere, ``--version`` on both commands."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from protocol.version import __version__

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["run_uplink.py", "run_gateway.py"])
def test_version_flag_prints_the_package_version(script: str) -> None:
    done = subprocess.run(
        [sys.executable, script, "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f" {__version__}")
    assert done.stderr == ""


def test_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert isinstance(project["license"], str)  # an SPDX expression, not the deprecated table
    assert (ROOT / "LICENSE").is_file()


def test_identity_carries_the_same_version() -> None:
    from actors.config import UplinkConfig

    assert UplinkConfig().identity_extra["version"] == __version__


def _name(requirement: str) -> str:
    import re

    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_declared_dependency_is_pinned_in_the_constraints() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]
    declared = set(map(_name, project["dependencies"]))
    for extra in project["optional-dependencies"].values():
        declared |= set(map(_name, extra))
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[_name(name)] = version
    assert declared - pinned.keys() == set(), "declared but not pinned in constraints.txt"
    assert all(pinned.values()), "every constraint is an exact == pin"


def test_no_source_points_at_documents_outside_the_repo() -> None:
    # The contract and the house style live outside a clone; the code says why
    # in its own words, or points into docs/.
    outside = ("DESIGN" + ".md", "PROTOCOL" + ".md")
    sources = [*ROOT.glob("*.py")]
    for folder in ("protocol", "actors", "sled_gateway", "demo", "tests", "bench", "examples"):
        sources += (ROOT / folder).rglob("*.py")
    cited = [
        str(path.relative_to(ROOT))
        for path in sources
        if any(name in path.read_text("utf-8") for name in outside)
    ]
    assert cited == []


def test_the_wheel_installs_exactly_our_top_level_names(tmp_path: Path) -> None:
    # A top-level name another PyPI project also uses (``gateway``, ``demo``)
    # would overwrite its files on install and lose ours on its uninstall.
    import zipfile

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("sled_uplink-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = {name.split("/", 1)[0] for name in archive.namelist()}
    top_level = {n.removesuffix(".py") for n in names if not n.endswith(".dist-info")}
    assert top_level == {
        "actors",
        "protocol",
        "sled_gateway",
        "run_uplink",
        "run_gateway",
        "sled_claude",
    }
    packaged = set(zipfile.ZipFile(wheel).namelist())
    assert "sled_gateway/static/console.html" in packaged
    # The gateway reads the console's app files when it starts: one left out stops it.
    from sled_gateway.http.console import SHELL_PATHS

    for path in SHELL_PATHS:
        assert f"sled_gateway/static{path}" in packaged, path


def test_every_gateway_package_is_packaged() -> None:
    # The wheel lists its packages by name: a subpackage left out installs a
    # gateway that fails on its first import.
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"][
            "packages"
        ]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "sled_gateway").rglob("__init__.py")
    }
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
