"""Prometheus metrics (``GET /metrics``).

Pipeline figures are read from the database at scrape time (a few GROUP BY queries), so they are right whichever
process did the work (SCP, workers, API) and survive restarts:

* ``omnict_queue_depth{state}``: runs waiting in each non-terminal state (the pipeline's queues);
* ``omnict_runs{state}``: runs in every state, terminal ones included;
* ``omnict_stage_duration_seconds{stage}``: histogram of finished stage attempts (``run_stages.duration_s``);
* ``omnict_stage_attempts_total{stage,outcome}`` and ``omnict_stage_failures_total{stage}`` (outcome failed/retry);
* ``omnict_deliveries{state}``, ``omnict_worklist_items{status}``, ``omnict_quarantined_instances``.

The API's own traffic is counted in process: ``omnict_api_requests_total{method,route,status}`` and
``omnict_api_request_duration_seconds{route}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Delivery, PipelineRun, QuarantinedInstance, RunState, StageRecord, WorklistItem
from db.states import TERMINAL

STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DatabaseCollector(Collector):
    """Collects the pipeline figures from the database on every scrape."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterable[Metric]:
        with self.session_factory() as session:
            yield from self._runs(session)
            yield from self._stages(session)
            yield from self._simple_gauge(session, "omnict_deliveries", "Deliveries by state.", "state",
                                          Delivery.state, ("pending", "delivered", "failed"))
            yield from self._simple_gauge(session, "omnict_worklist_items", "Worklist items by status.", "status",
                                          WorklistItem.status, ("unread", "claimed", "completed"))
            quarantined = session.scalar(select(func.count(QuarantinedInstance.id))) or 0
            yield GaugeMetricFamily("omnict_quarantined_instances", "Instances held in quarantine.", value=quarantined)

    def _runs(self, session: Session) -> Iterable[Metric]:
        counts = {state: 0 for state in RunState}
        for state, count in session.execute(select(PipelineRun.state, func.count(PipelineRun.id))
                                            .group_by(PipelineRun.state)):
            counts[state] = count
        queue = GaugeMetricFamily("omnict_queue_depth", "Runs waiting in each non-terminal state.", labels=["state"])
        runs = GaugeMetricFamily("omnict_runs", "Pipeline runs by state.", labels=["state"])
        for state, count in counts.items():
            runs.add_metric([state.value], count)
            if state not in TERMINAL:
                queue.add_metric([state.value], count)
        yield queue
        yield runs

    def _stages(self, session: Session) -> Iterable[Metric]:
        duration = StageRecord.duration_s
        bucket_columns = [func.sum(case((duration <= le, 1), else_=0)) for le in STAGE_BUCKETS]
        histogram = HistogramMetricFamily("omnict_stage_duration_seconds", "Duration of finished stage attempts.",
                                          labels=["stage"])
        rows = session.execute(select(StageRecord.stage, func.count(StageRecord.id), func.sum(duration), *bucket_columns)
                               .where(duration.is_not(None)).group_by(StageRecord.stage).order_by(StageRecord.stage))
        for stage, count, total, *cumulative in rows:
            buckets = [(repr(le), int(c or 0)) for le, c in zip(STAGE_BUCKETS, cumulative, strict=True)] + [("+Inf", int(count))]
            histogram.add_metric([stage], buckets, float(total or 0.0))
        yield histogram
        attempts = CounterMetricFamily("omnict_stage_attempts", "Stage attempts by outcome.", labels=["stage", "outcome"])
        failures = CounterMetricFamily("omnict_stage_failures", "Stage attempts that failed (retried or final).",
                                       labels=["stage"])
        failed_by_stage: dict[str, int] = {}
        for stage, outcome, count in session.execute(
                select(StageRecord.stage, StageRecord.outcome, func.count(StageRecord.id))
                .group_by(StageRecord.stage, StageRecord.outcome).order_by(StageRecord.stage)):
            attempts.add_metric([stage, outcome], count)
            failed_by_stage.setdefault(stage, 0)
            if outcome in ("failed", "retry"):
                failed_by_stage[stage] += count
        for stage, count in failed_by_stage.items():
            failures.add_metric([stage], count)
        yield attempts
        yield failures

    @staticmethod
    def _simple_gauge(session: Session, name: str, doc: str, label: str, column, known: tuple[str, ...]) -> Iterable[Metric]:
        counts = dict.fromkeys(known, 0)
        for value, count in session.execute(select(column, func.count()).group_by(column)):
            counts[value] = count
        gauge = GaugeMetricFamily(name, doc, labels=[label])
        for value, count in counts.items():
            gauge.add_metric([value], count)
        yield gauge


class ApiMetrics:
    """The app's registry: the database collector plus in-process HTTP request metrics."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DatabaseCollector(session_factory))
        self.requests = Counter("omnict_api_requests", "HTTP requests answered.", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("omnict_api_request_duration_seconds", "HTTP request duration.", ["route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): counts requests by route template, not raw path,
    so UIDs in paths do not explode the label space."""

    def __init__(self, app, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], template, str(status_holder["status"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - started)
