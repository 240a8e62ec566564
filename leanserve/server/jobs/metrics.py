"""The jobs' Prometheus metrics: `leanserve:jobs{status}` (read from the store at scrape time) and
`leanserve:job_duration_seconds{command,status}` (one observation per run of a job's process)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

from leanserve.server.jobs.store import ACTIVE, FINISHED
from leanserve.server.metrics import P

# 10 s .. 1 week, roughly x3: a tiny test job to a long distillation
JOB_DURATION_BUCKETS = [10.0, 30.0, 60.0, 180.0, 600.0, 1800.0, 3600.0, 10800.0, 36000.0, 86400.0, 259200.0,
                        604800.0]


class _JobsCollector:
    def __init__(self, count_by_status: Callable[[], dict[str, int]]):
        self.count_by_status = count_by_status

    def collect(self):
        gauge = GaugeMetricFamily(P + "jobs", "Jobs by status.", labels=["status"])
        counts = self.count_by_status()
        for status in (*ACTIVE, *FINISHED):
            gauge.add_metric([status], counts.get(status, 0))
        yield gauge


def register_job_metrics(registry: CollectorRegistry, count_by_status: Callable[[], dict[str, int]]) -> Histogram:
    """Adds both to `registry`; returns the duration histogram."""
    registry.register(_JobsCollector(count_by_status))
    return Histogram(P + "job_duration_seconds", "Run time of a job's process, by command and outcome.",
                     ["command", "status"], buckets=JOB_DURATION_BUCKETS, registry=registry)
