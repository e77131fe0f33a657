#!/usr/bin/env python3
"""Write the option tables of docs/command-line.md from the options' declarations.

    python scripts/gen-cli-docs.py          # rewrite the tables in place
    python scripts/gen-cli-docs.py --check  # exit 1 if a table is out of date

One table per command (``run_uplink.py``, ``run_gateway.py``), each between
two HTML comments in the page, so the prose around them stays hand-written;
the rows come from the same ``Option`` objects that build each command's
parser, so the page cannot drift from ``--help``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from actors.cli import Option

PAGE = ROOT / "docs" / "command-line.md"
BEGIN = "<!-- {}:begin (scripts/gen-cli-docs.py writes this table) -->"
END = "<!-- {}:end -->"


def uplink_options() -> list[Option]:
    from run_uplink import all_options

    return [spec for _, spec in all_options()]


def gateway_options() -> list[Option]:
    from run_gateway import all_options, matrix_options

    return [spec for _, spec in all_options() + matrix_options()]


#: The marker's name → the options of its table.
TABLES: dict[str, Callable[[], list[Option]]] = {
    "options": uplink_options,
    "gateway-options": gateway_options,
}


def table(options: list[Option]) -> str:
    rows = ["| option | env | default | |", "| --- | --- | --- | --- |"]
    for spec in options:
        name = spec.flag if spec.switch else f"{spec.flag} {spec.metavar or 'S'}"
        env = f"`{spec.env}`" if spec.env else ""
        cells = [f"`{name}`", env, spec.default_text(), spec.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def render(page: str) -> str:
    for name, options in TABLES.items():
        begin_marker, end_marker = BEGIN.format(name), END.format(name)
        head, begin, rest = page.partition(begin_marker)
        _, end, tail = rest.partition(end_marker)
        if not begin or not end:
            raise SystemExit(f"{PAGE}: the markers {begin_marker!r} and {end_marker!r} are missing")
        page = f"{head}{begin_marker}\n{table(options())}\n{end_marker}{tail}"
    return page


def main(argv: list[str]) -> int:
    current = PAGE.read_text("utf-8")
    wanted = render(current)
    if "--check" in argv:
        if current != wanted:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run scripts/gen-cli-docs.py")
            return 1
        return 0
    PAGE.write_text(wanted, "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
