"""The Synapse the Matrix tests run against (it lives in the demo, which starts one too)."""

from demo.synapse import SERVER_NAME, Synapse, SynapseUnavailable, free_port, synapse_python

__all__ = ["SERVER_NAME", "Synapse", "SynapseUnavailable", "free_port", "synapse_python"]
