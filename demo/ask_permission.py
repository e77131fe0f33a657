"""Fire a sample permission request at the uplink's local ingress and print the answer.

    python -m demo.ask_permission                                  # Bash: ls -la
    python -m demo.ask_permission --tool Write --input '{"path": "notes.txt"}'

It POSTs ``/permission`` to the uplink (``http://127.0.0.1:3002`` unless
``--ingress`` or ``SLED_DEMO_UPLINK_PORT`` says otherwise) and blocks until
someone answers in the gateway's console (or the uplink's permission timeout,
120 s by default, denies it). The curl equivalent::

    curl -s -X POST http://127.0.0.1:3002/permission \\
         -H 'Content-Type: application/json' \\
         -d '{"tool_name": "Bash", "tool_input": {"command": "ls -la"}}'

Exit status: 0 approved (approve / always_allow), 1 denied, 2 could not ask.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import httpx

from demo import DEFAULT_UPLINK_PORT, LOOPBACK, UPLINK_PORT_ENV, env_port

SAMPLE_INPUT = {"command": "ls -la", "description": "List the files in the sled's workspace"}


def main(argv: list[str] | None = None) -> int:
    default_ingress = f"http://{LOOPBACK}:{env_port(UPLINK_PORT_ENV, DEFAULT_UPLINK_PORT)}"
    parser = argparse.ArgumentParser(
        prog="python -m demo.ask_permission",
        description="Ask the gateway (through the uplink) for permission to run a tool.",
    )
    parser.add_argument(
        "--ingress",
        default=default_ingress,
        help=f"the uplink's local ingress (env {UPLINK_PORT_ENV} sets the port; "
        "default %(default)s)",
    )
    parser.add_argument("--tool", default="Bash", help="tool name (default %(default)s)")
    parser.add_argument(
        "--input",
        default=json.dumps(SAMPLE_INPUT),
        help="tool input as JSON (default: a harmless `ls -la`)",
    )
    parser.add_argument(
        "--request-id", default=None, help="request id (default: a fresh demo-… id)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=180.0,
        help="seconds to wait for the answer (default %(default)s; "
        "the uplink itself denies after its permission timeout)",
    )
    args = parser.parse_args(argv)
    try:
        tool_input = json.loads(args.input)
    except ValueError as exc:
        parser.error(f"--input is not JSON: {exc}")

    request_id = args.request_id or f"demo-{uuid.uuid4().hex[:8]}"
    body = {"tool_name": args.tool, "tool_input": tool_input, "request_id": request_id}
    url = args.ingress.rstrip("/") + "/permission"
    print(
        f"asking permission for {args.tool} {json.dumps(tool_input)} (request {request_id});\n"
        "waiting for an answer in the gateway console...",
        flush=True,
    )
    try:
        response = httpx.post(url, json=body, timeout=httpx.Timeout(10.0, read=args.timeout))
    except httpx.HTTPError as exc:
        print(f"ask_permission: could not reach the uplink at {url}: {exc}", file=sys.stderr)
        return 2
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": response.text}
    if response.status_code != 200:
        print(
            f"ask_permission: the uplink answered HTTP {response.status_code}: {answer}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(answer, indent=2, ensure_ascii=False))
    decision = answer.get("decision")
    print(f"decision: {decision} (reason: {answer.get('reason')})", flush=True)
    return 0 if decision in ("approve", "always_allow") else 1


if __name__ == "__main__":
    sys.exit(main())
