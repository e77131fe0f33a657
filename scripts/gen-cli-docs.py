#!/usr/bin/env python3
"""Write the option table of docs/command-line.md from the options' declarations.

    python scripts/gen-cli-docs.py          # rewrite the table in place
    python scripts/gen-cli-docs.py --check  # exit 1 if the table is out of date

The table sits between two HTML comments in the page, so the prose around it
stays hand-written; the rows come from the same ``Option`` objects that build
``run_uplink.py``'s parser, so the page cannot drift from ``--help``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGE = ROOT / "docs" / "command-line.md"
BEGIN = "<!-- options:begin (scripts/gen-cli-docs.py writes this table) -->"
END = "<!-- options:end -->"


def table() -> str:
    from run_uplink import all_options

    rows = ["| option | env | default | |", "| --- | --- | --- | --- |"]
    for _, spec in all_options():
        name = spec.flag if spec.switch else f"{spec.flag} {spec.metavar or 'S'}"
        env = f"`{spec.env}`" if spec.env else ""
        cells = [f"`{name}`", env, spec.default_text(), spec.help]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def render(page: str) -> str:
    head, begin, rest = page.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{PAGE}: the markers {BEGIN!r} and {END!r} are missing")
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


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
