"""The library API's figures of two checkouts, alternating: do they stay within noise?

    .venv/bin/python -m bench.library_ab /tmp/old            # 4 pairs of 4 rounds, ~1 min
    .venv/bin/python -m bench.library_ab /tmp/old --pairs 6 --rounds 6

``bench.run``'s library figures (decisions/s at 64 in flight and the permission
p50, asyncio and blocking faces, each as a ratio to the raw websockets client of
the same round) are measured by :mod:`bench.library_rounds`, in a process of its
own per side: this tree's measuring code and raw baselines for both, with the
uplink (``actors``, ``protocol``) imported from the checkout under test. The
sides alternate (A B, B A, ...), so a drift of the machine's load falls on both.

For each figure it prints each side's median over the pairs, the ratio, and
each side's range (its runs' medians): the noise of this machine now. Where the
two ranges overlap the figure is "within noise"; where every run of one side is
beyond every run of the other, the line says which way it moved (with 4 pairs,
two runs of the same code fall apart so about once in 35 figures). Make the
other checkout with ``git archive``::

    rm -rf /tmp/old && mkdir /tmp/old && git archive main | tar -x -C /tmp/old
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from bench.run import PY, REPO

# The figure's line of bench.library_rounds: NAME, "median", the ratio and a multiplication sign.
_LINE = re.compile(r"^(?P<name>.+?)\s+median (?P<median>[0-9.]+)\u00d7")
# Where higher is better (a rate); for the others (a latency's ratio) lower is.
_HIGHER_IS_BETTER = ("decisions/s",)

_RUNNER = """
import sys
sys.path.insert(0, {checkout!r})
import actors, protocol  # the uplink under test, from its checkout
sys.path.insert(0, {repo!r})  # this tree's measuring code
from bench.library_rounds import main
sys.exit(main([{rounds!r}]))
"""


def one_side(checkout: Path, rounds: int) -> dict[str, float]:
    """One ``library_rounds`` run of ``checkout``'s uplink: each figure's median ratio."""
    code = _RUNNER.format(checkout=str(checkout), repo=str(REPO), rounds=str(rounds))
    done = subprocess.run(
        [PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=1800, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: library_rounds failed:\n{done.stderr[-2000:]}")
    found = {}
    for line in done.stdout.splitlines():
        match = _LINE.match(line)
        if match:
            found[match["name"].strip()] = float(match["median"])
    if not found:
        raise RuntimeError(f"{checkout}: no figures in\n{done.stdout[-2000:]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (e.g. from git archive)")
    parser.add_argument("--pairs", type=int, default=4, help="alternations (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="library_rounds rounds per run")
    args = parser.parse_args(argv)
    other = args.other.resolve()
    if not (other / "actors" / "__init__.py").is_file():
        parser.error(f"{other} is not a checkout of this project (no actors/)")
    if args.pairs < 2 or args.rounds < 1:
        parser.error("--pairs must be at least 2 (the noise is their spread), --rounds 1")
    sides = {"this": REPO, "other": other}
    runs: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
    for i in range(args.pairs):
        order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
        for name, checkout in order:
            print(f"... pair {i + 1}, {name}", file=sys.stderr, flush=True)
            runs[name].append(one_side(checkout, args.rounds))
    print(f"this: {REPO}\nother: {other}\n{args.pairs} pairs × {args.rounds} rounds, alternating")
    header = f"{'figure (ratio to raw)':38s} {'this':>6} {'other':>6} {'this/other':>10}"
    print(f"{header}  ranges: this | other\n{'-' * (len(header) + 36)}")
    moved = 0
    for figure in runs["this"][0]:
        mine = [r[figure] for r in runs["this"] if figure in r]
        theirs = [r[figure] for r in runs["other"] if figure in r]
        if not theirs:
            continue
        ratio = statistics.median(mine) / statistics.median(theirs)
        if max(mine) >= min(theirs) and max(theirs) >= min(mine):
            verdict = "within noise"
        else:
            better = (ratio > 1) == figure.startswith(_HIGHER_IS_BETTER)
            verdict = "BETTER" if better else "WORSE"
            moved += not better
        print(
            f"{figure:38s} {statistics.median(mine):>6.2f} {statistics.median(theirs):>6.2f} "
            f"{ratio:>9.2f}x  {min(mine):.2f}-{max(mine):.2f} | "
            f"{min(theirs):.2f}-{max(theirs):.2f}: {verdict}"
        )
    print(f"\n{moved} figure(s) worse beyond the noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
