"""The ingress's ``GET /metrics``: Prometheus text of the counters and gauges /status shows.

A module of its own so that prometheus_client (which imports http.server,
wsgiref and email) loads on the first scrape, not with the ingress: the
ingress imports it then (``Ingress._metrics``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from actors.context import UplinkContext

CONNECTION_STATES = ("disabled", "connecting", "connected", "backoff", "stopping", "stopped")


class UplinkMetrics:
    """One uplink's Prometheus registry."""

    def __init__(self, ctx: UplinkContext) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_UplinkCollector(ctx))

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _UplinkCollector(Collector):
    """Prometheus view of the same counters and gauges /status shows."""

    def __init__(self, ctx: UplinkContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterable[Any]:
        from actors.status import snapshot

        snap = snapshot(self.ctx)
        counters = snap.get("counters", {})
        gauges = snap.get("gauges", {})
        connection = snap.get("connection", {})
        state = GaugeMetricFamily(
            "sled_uplink_connection_state", "1 for the current connection state", labels=["state"]
        )
        for name in CONNECTION_STATES:
            state.add_metric([name], 1.0 if connection.get("state") == name else 0.0)
        yield state
        yield GaugeMetricFamily(
            "sled_uplink_permissions_pending",
            "Undecided permission requests",
            value=snap.get("permissions", {}).get("pending", 0),
        )
        yield GaugeMetricFamily(
            "sled_uplink_mcp_in_flight",
            "MCP replays running or waiting",
            value=gauges.get("mcp_in_flight", 0),
        )
        yield GaugeMetricFamily(
            "sled_uplink_backoff_seconds",
            "Current reconnect back-off wait (0 when connected)",
            value=connection.get("backoff") or 0 if connection.get("state") == "backoff" else 0,
        )
        families = [
            ("decisions", "decision", "Permission decisions by kind"),
            ("decision_reasons", "reason", "Permission decisions by reason"),
            ("frames_in", "type", "Frames received, by type"),
            ("frames_out", "type", "Frames sent, by type"),
            ("frames_dropped", "reason", "Inbound frames dropped, by reason"),
            ("sessions", "event", "Sessions that came up / ended"),
            ("actor_crashes", "role", "Actor crashes, by role"),
        ]
        for family, label, doc in families:
            metric = CounterMetricFamily(f"sled_uplink_{family}", doc, labels=[label])
            for key, value in sorted(counters.get(family, {}).items()):
                metric.add_metric([key], value)
            yield metric
