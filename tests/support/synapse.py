"""The Synapse the Matrix tests run against (it lives in the demo, which starts one too)."""

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from demo.synapse import SERVER_NAME, Synapse, SynapseUnavailable, free_port, synapse_python
from tests.support.matrix_client import MatrixPerson

NOT_INSTALLED = "Synapse is not installed (bash scripts/install-synapse.sh installs it)"


@contextmanager
def homeserver_with(
    directory: Path, accounts: Mapping[str, str], clients: Mapping[str, str]
) -> Iterator[tuple[Synapse, dict[str, MatrixPerson]]]:
    """A started Synapse with ``accounts`` (name → password) registered, and a signed-in
    client for each ``clients`` entry (name → Matrix user id); the clients are closed and
    Synapse stopped on exit, a failed start-up included. Skips the test when Synapse is not
    installed or will not start (a missing optional part, not a failure of ours)."""
    python = synapse_python()
    if python is None:
        pytest.skip(NOT_INSTALLED)
    synapse = Synapse(directory, python)
    try:
        synapse.start()
    except SynapseUnavailable as exc:
        pytest.skip(f"Synapse would not start: {exc}")
    with ExitStack() as cleanup:
        cleanup.callback(synapse.stop)
        for name, password in accounts.items():
            synapse.register(name, password)
        people: dict[str, MatrixPerson] = {}
        for name, user_id in clients.items():
            people[name] = MatrixPerson(synapse.url, user_id, accounts[name])
            cleanup.callback(people[name].close)
        yield synapse, people


__all__ = [
    "NOT_INSTALLED",
    "SERVER_NAME",
    "Synapse",
    "SynapseUnavailable",
    "free_port",
    "homeserver_with",
    "synapse_python",
]
