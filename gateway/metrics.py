"""Prometheus metrics of the gateway.

Counters of the SCP live in this process (the SCP only runs in the gateway). Everything that
workers in other processes do is read at scrape time from the shared SQLite state and audit
trail, so the numbers are right in embedded and distributed mode alike. Labels carry states,
stages and DIMSE status names only — never identifiers.
"""

from __future__ import annotations

import shutil
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.state import Stage, State, StateStore
from gateway.trail import AuditTrail

#: Stage latency buckets, seconds (assemble ~1 s … forward of a big series ~minutes).
BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))
STAGES = ("assemble", "deface", "deidentify", "audit", "forward")


class GatewayCollector(Collector):
    """Derives series, queue, retry and spool figures from the shared state at scrape time."""

    def __init__(self, store: StateStore, trail: AuditTrail, spool_root: Path) -> None:
        self.store, self.trail, self.spool_root = store, trail, spool_root

    def collect(self) -> Iterator[Metric]:
        records = self.store.find(*State)
        by_state = Tally(r.state for r in records)
        series = GaugeMetricFamily(
            "defacegate_series", "Series known to the gateway, by state", labels=["state"]
        )
        for state in State:
            series.add_metric([state.value], by_state.get(state, 0))
        yield series

        queue = GaugeMetricFamily(
            "defacegate_queue_depth", "Series waiting for a stage's worker", labels=["queue"]
        )
        for stage in Stage:
            queue.add_metric([stage.value], by_state.get(stage.ready_state, 0))
        yield queue

        yield GaugeMetricFamily(
            "defacegate_dead_letter_series",
            "Series in the dead-letter state (failed; `defacegate retry` re-queues)",
            value=by_state.get(State.FAILED, 0),
        )
        retries = GaugeMetricFamily(
            "defacegate_forward_retries", "Forward attempts that will be retried (all time)"
        )
        retries.add_metric([], self.trail.count("forward_retry"))
        yield retries

        usage = shutil.disk_usage(self.spool_root)
        yield GaugeMetricFamily(
            "defacegate_spool_free_bytes", "Free space on the spool file system", value=usage.free
        )

        latency = HistogramMetricFamily(
            "defacegate_stage_seconds", "Wall time of each pipeline stage", labels=["stage"]
        )
        durations = self.trail.durations()
        for name in STAGES:
            values = durations.get(name, [])
            latency.add_metric([name], _buckets(values), sum(values))
        yield latency


def _buckets(values: Iterable[float]) -> list[tuple[str, float]]:
    values = sorted(values)
    out, i = [], 0
    for bound in BUCKETS:
        while i < len(values) and values[i] <= bound:
            i += 1
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(i)))
    return out


class Metrics:
    """The registry of one gateway process; handed to the SCP and the admin API."""

    def __init__(self, store: StateStore, trail: AuditTrail, spool_root: Path) -> None:
        self.registry = CollectorRegistry()
        self.instances = Counter(
            "defacegate_instances_received",
            "C-STORE requests answered, by response status",
            labelnames=["status"],
            registry=self.registry,
        )
        self.associations_rejected = Counter(
            "defacegate_associations_rejected",
            "Associations refused (allow-list, called AE, paused ingest, limits)",
            registry=self.registry,
        )
        self.registry.register(GatewayCollector(store, trail, spool_root))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
