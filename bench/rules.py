"""Rule evaluation cost per request, and how many real agent commands a prefix-rule set answers.

python -m bench.rules [--rounds N]

Prints one JSON object. For 100, 1,000 and 10,000 rules: p50 and p99 in
microseconds of ``RuleSet.evaluate`` over a mix of tool calls (the Bash
commands of ``bench/agent_commands.txt`` and file, fetch and MCP calls), both
for a command seen for the first time (parse cache cleared) and for a repeat,
beside a raw baseline measured in the same run: ``json.dumps`` of the input
plus a dict lookup, the least any gateway does with a request. Then, for the
sample of agent commands, how many a typical team prefix-rule set decides
without a human, and for how many ``prefix_rule`` has a rule to offer.

In the same run, the gateway's own figures at each size (``gateway``):
``Policy.match`` (what the gateway runs on its event loop per request: the
exact rows and the grammar rule set of the request's scope), and the
**decision round trip**: the reference gateway (in this process, its own
thread, an in-memory store, logging at INFO into a sink that drops it) holds
the rules, imported over ``POST /api/rules/import``; a sled on a real
WebSocket sends a ``perm_request`` a rule allows and waits for its
``perm_response``. Each sample includes the audit row's commit.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from protocol.rules import Action, PermissionRule, RuleSet, exact_rule, parse_rule, prefix_rule
from protocol.shell import _parse_cached

COMMANDS_FILE = Path(__file__).with_name("agent_commands.txt")

# What a team writes after a week of prompts: read-only tools, tests, builds.
TYPICAL_ALLOW = [
    *(f"Bash(git {sub}:*)" for sub in (
        "status", "diff", "log", "show", "branch", "add", "commit", "checkout", "stash",
        "rev-parse", "blame", "pull",
    )),
    "Bash(npm test:*)", "Bash(npm run:*)", "Bash(npm install:*)", "Bash(npm ci)",
    "Bash(npx tsc:*)", "Bash(npx eslint:*)", "Bash(npx prettier:*)", "Bash(npx jest:*)",
    "Bash(yarn test:*)", "Bash(pnpm install)", "Bash(pnpm run:*)",
    "Bash(pytest:*)", "Bash(python -m pytest:*)", "Bash(uv run pytest:*)", "Bash(pip list:*)",
    "Bash(ruff:*)", "Bash(mypy:*)", "Bash(black:*)",
    "Bash(ls:*)", "Bash(cat:*)", "Bash(head:*)", "Bash(tail:*)", "Bash(wc:*)", "Bash(grep:*)",
    "Bash(rg:*)", "Bash(sed -n:*)", "Bash(find:*)", "Bash(tree:*)", "Bash(pwd)", "Bash(mkdir:*)",
    "Bash(touch:*)", "Bash(cd:*)", "Bash(make:*)", "Bash(cargo build:*)", "Bash(cargo test:*)",
    "Bash(go test:*)", "Bash(docker ps:*)", "Bash(which:*)", "Bash(node --version)",
    "Bash(diff:*)", "Bash(sort:*)", "Bash(uniq:*)", "Bash(jq:*)", "Bash(echo:*)",
    "Read(//home/dev/project/**)", "Edit(//home/dev/project/src/**)",
    "WebFetch(domain:docs.python.org)", "mcp__github",
]  # fmt: skip
TYPICAL_ASK = ["Bash(git push:*)", "Bash(docker compose:*)", "Bash(rm:*)"]
TYPICAL_DENY = [
    "Bash(git push --force:*)", "Bash(curl * | sh)", "Bash(sudo:*)",
    "Read(//home/dev/.ssh/**)", "Read(//**/.env)",
]  # fmt: skip

OTHER_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("Read", {"file_path": "/home/dev/project/src/app.py"}),
    ("Read", {"file_path": "/home/dev/project/tests/test_app.py"}),
    ("Read", {"file_path": "/home/dev/.ssh/id_ed25519"}),
    ("Edit", {"file_path": "/home/dev/project/src/app.py", "old_string": "a", "new_string": "b"}),
    ("Write", {"file_path": "/home/dev/project/src/new.py", "content": "x = 1\n"}),
    ("WebFetch", {"url": "https://docs.python.org/3/library/re.html", "prompt": "summarise"}),
    ("mcp__github__create_issue", {"title": "t", "body": "b"}),
]


def typical_entries() -> list[tuple[int, PermissionRule, Action]]:
    entries: list[tuple[int, PermissionRule, Action]] = []
    for action, texts in (("allow", TYPICAL_ALLOW), ("ask", TYPICAL_ASK), ("deny", TYPICAL_DENY)):
        for text in texts:
            entries.append((len(entries), parse_rule(text), action))  # type: ignore[arg-type]
    return entries


def filler(count: int, seed: int) -> list[tuple[int, PermissionRule, Action]]:
    """Synthetic rules of a large fleet: mostly per-tool Bash prefixes, some
    path, fetch and MCP rules, and 1% with a leading wildcard (not indexable)."""
    rng = random.Random(seed)
    out: list[tuple[int, PermissionRule, Action]] = []
    for i in range(count):
        roll = rng.random()
        action: Action = rng.choice(("allow", "allow", "allow", "ask", "deny"))
        if roll < 0.01:
            text = f"Bash(* --flag{i})"
        elif roll < 0.65:
            text = f"Bash(tool{i % 997} sub{i}:*)"
        elif roll < 0.85:
            text = f"Read(//srv/project{i}/**)" if i % 2 else f"Edit(//srv/project{i}/src/**)"
        elif roll < 0.95:
            text = f"WebFetch(domain:host{i}.example.com)"
        else:
            text = f"mcp__server{i}"
        out.append((10_000 + i, parse_rule(text), action))
    return out


def calls() -> list[tuple[str, dict[str, Any]]]:
    lines = [line for line in COMMANDS_FILE.read_text().splitlines() if line and line[0] != "#"]
    return [("Bash", {"command": c, "description": "x"}) for c in lines] + OTHER_CALLS


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    cut = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50_us": round(cut[49] / 1000, 1), "p99_us": round(cut[98] / 1000, 1)}


def measure(size: int, rounds: int) -> dict[str, Any]:
    base = typical_entries()
    rules = RuleSet(base + filler(size - len(base), seed=size))
    mix = calls()
    table = {name: i for i, (name, _) in enumerate(mix)}
    first: list[int] = []
    repeat: list[int] = []
    raw: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        _parse_cached.cache_clear()
        for tool_name, tool_input in mix:
            start = clock()
            rules.evaluate(tool_name, tool_input)
            first.append(clock() - start)
        for tool_name, tool_input in mix:
            start = clock()
            rules.evaluate(tool_name, tool_input)
            repeat.append(clock() - start)
            start = clock()
            json.dumps(tool_input)
            table.get(tool_name)
            raw.append(clock() - start)
    figures = {
        "first_sight": percentiles(first),
        "repeat": percentiles(repeat),
        "raw_baseline": percentiles(raw),
    }
    base = figures["raw_baseline"]["p50_us"]
    return {
        "rules": len(rules),
        **figures,
        # How many raw baselines one evaluation costs (p50 over p50, same run).
        "p50_x_raw": {
            "first_sight": round(figures["first_sight"]["p50_us"] / base, 1),
            "repeat": round(figures["repeat"]["p50_us"] / base, 1),
        },
    }


def sample_report() -> dict[str, Any]:
    rules = RuleSet(typical_entries())
    lines = [line for line in COMMANDS_FILE.read_text().splitlines() if line and line[0] != "#"]
    counts: dict[str, int] = {"allow": 0, "ask": 0, "deny": 0, "human": 0}
    undecided: list[str] = []
    offered = 0
    for command in lines:
        verdict = rules.evaluate("Bash", {"command": command})
        counts[verdict.action or "human"] += 1
        if verdict.action is None:
            undecided.append(command)
        if prefix_rule("Bash", {"command": command}) is not None:
            offered += 1
    # Starting from no rules, a person answers each prompt with "always allow"
    # and the console's prefix rule (the exact rule when it offers none): how
    # many of the commands that follow need nobody?
    learned: list[tuple[int, PermissionRule, Action]] = []
    asked = 0
    for command in lines:
        if RuleSet(learned).evaluate("Bash", {"command": command}).action == "allow":
            continue
        asked += 1
        offer = prefix_rule("Bash", {"command": command}) or exact_rule(
            "Bash", {"command": command}
        )
        if offer is not None:
            learned.append((len(learned), parse_rule(offer), "allow"))
    return {
        "commands": len(lines),
        "learning_from_empty": {"asked": asked, "rules_made": len(learned)},
        "typical_rules": len(rules),
        "decided_without_a_human": counts["allow"] + counts["deny"],
        "by_action": counts,
        "prefix_rule_offered": offered,
        "left_to_a_human": undecided,
    }


def policy_match(size: int, rounds: int) -> dict[str, Any]:
    """``Policy.match`` over the same mix, the rules as the gateway holds them (fleet-wide)."""
    from sled_gateway.policy import Policy
    from sled_gateway.store import Rule

    base = typical_entries()
    entries = base + filler(size - len(base), seed=size)
    policy = Policy(
        Rule(i + 1, None, p.tool, None, action, 0.0, "bench", rule=p.text)
        for i, (_, p, action) in enumerate(entries)
    )
    mix = calls()
    samples: list[int] = []
    clock = time.perf_counter_ns
    policy.match("bench", "Bash", {"command": "true"})  # builds the rule set once
    for _ in range(rounds):
        for tool_name, tool_input in mix:
            start = clock()
            policy.match("bench", tool_name, tool_input)
            samples.append(clock() - start)
    return {"rules": len(policy), "policy_match": percentiles(samples)}


def round_trip(size: int, samples: int) -> dict[str, Any]:
    """A ``perm_request`` answered by a rule, end to end over a real WebSocket."""
    import asyncio

    import httpx
    from loguru import logger
    from websockets.asyncio.client import connect

    from sled_gateway import Gateway

    logger.remove()
    logger.add(lambda _message: None, level="INFO")  # formatted as in production, not shown
    base = typical_entries()
    texts = sorted(
        {p.text: action for _, p, action in base + filler(size - len(base), size)}.items()
    )
    gw = Gateway(token="bench-token").start()
    try:
        with httpx.Client(base_url=gw.http_url, headers=gw.api_headers(), timeout=60) as client:
            for at in range(0, len(texts), 5000):
                block: dict[str, list[str]] = {"allow": [], "ask": [], "deny": []}
                for text, action in texts[at : at + 5000]:
                    block[action].append(text)
                answer = client.post("/api/rules/import", json={"permissions": block})
                answer.raise_for_status()

        async def probe() -> list[int]:
            taken: list[int] = []
            async with connect(gw.url_for_sleds()) as ws:
                await ws.send(json.dumps({"type": "identity", "req_id": "identity",
                                          "payload": {"project": "bench"}}))  # fmt: skip
                while not any(s["project"] == "bench" for s in gw.state()["sleds"]):
                    await asyncio.sleep(0.01)
                for i in range(samples + 20):  # the first 20 warm up (the rule set is built)
                    request = {
                        "tool_name": "Bash",
                        "tool_input": {"command": f"npm test -- -k t{i}"},
                    }
                    start = time.perf_counter_ns()
                    await ws.send(json.dumps({"type": "perm_request", "req_id": f"r{i}",
                                              "payload": request}))  # fmt: skip
                    while True:
                        frame = json.loads(await ws.recv())
                        if frame.get("type") == "perm_response" and frame.get("req_id") == f"r{i}":
                            break
                    assert frame["payload"]["approved"], frame
                    if i >= 20:
                        taken.append(time.perf_counter_ns() - start)
            return taken

        taken = asyncio.run(probe())
    finally:
        gw.stop()
    return {"rules": len(texts), "round_trip": percentiles(taken), "samples": len(taken)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--trips", type=int, default=300, help="round trips per size")
    args = parser.parse_args()
    sizes = (100, 1_000, 10_000)
    figures = {
        "evaluate": [measure(size, args.rounds) for size in sizes],
        "sample": sample_report(),
        "gateway": [
            {**policy_match(size, args.rounds), **round_trip(size, args.trips)} for size in sizes
        ],
    }
    for row in figures["gateway"]:
        # The share of a decision's round trip that matching the rules takes.
        row["policy_match_share_of_round_trip"] = round(
            row["policy_match"]["p50_us"] / row["round_trip"]["p50_us"], 3
        )
    print(json.dumps(figures, indent=1), flush=True)


if __name__ == "__main__":
    main()
