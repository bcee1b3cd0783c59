"""The service's Prometheus metrics, correct across worker processes.

``signbridge server run`` points ``PROMETHEUS_MULTIPROC_DIR`` at an empty directory before any
worker starts (``DATA_DIR/metrics/<pid>``); each worker then keeps its values in a memory-mapped file there (prometheus_client's
multiprocess mode) and a scrape, whichever worker or listener answers it, adds up every file. An
update is a write into that mapping under a per-process lock: cheap enough for the signing routes.
Without the variable (the app embedded in another server) the metrics are this process's own.

prometheus_client decides between the two when it is first imported, so only the worker side
(:mod:`.app`) imports this module; the audit log and the signing service report through observers.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from .audit_chain import AuditEntry

MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SIGNING_REQUESTS = Counter(
    "signbridge_signing_requests",
    "Signing requests by organization, project, policy, algorithm and outcome "
    "(granted, denied, rejected, failed); the caller's project and policy only once authenticated.",
    ["organization", "project", "policy", "algorithm", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "signbridge_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, per route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
RESPONSES = Counter("signbridge_http_responses", "Responses per route and status code.", ["route", "status"])
AUDIT_QUEUE_DEPTH = Gauge(
    "signbridge_audit_queue_depth",
    "Audit records waiting to be committed, over all workers.",
    multiprocess_mode="livesum",
)
AUDIT_COMMIT_SECONDS = Histogram(
    "signbridge_audit_commit_seconds",
    "Time to commit one batch of audit records (group commit) in the audit writer.",
    buckets=_LATENCY_BUCKETS,
)
AUDIT_ERRORS = Counter("signbridge_audit_errors", "Batches of audit records that could not be committed.")
KEYSTORE_ERRORS = Counter("signbridge_keystore_errors", "Signatures the keystore could not make.", ["backend"])
RATE_LIMITED = Counter(
    "signbridge_rate_limit_rejections", "Requests refused with 429 by the per-token rate limit.", ["organization"]
)

ROUTES = ("signhash", "signingrequests", "mysigningpolicies", "timestamp", "healthz", "readyz", "metrics", "openapi", "other")


class RouteTimer:
    """The latency histogram and response counter of one route, bound once so that a request pays
    for no label lookup."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.seconds = REQUEST_SECONDS.labels(route)
        self._responses: dict[int, Counter] = {}

    def observe(self, status: int, seconds: float) -> None:
        self.seconds.observe(seconds)
        counter = self._responses.get(status)
        if counter is None:
            counter = self._responses[status] = RESPONSES.labels(self.route, str(status))
        counter.inc()


TIMERS = {route: RouteTimer(route) for route in ROUTES}


def route_of(path: str) -> str:
    """The route label of a lower-cased request path: a fixed set, never the path itself."""
    if path.startswith("/api/v1/"):
        for suffix, route in (("/signingrequests/signhash", "signhash"), ("/signingrequests", "signingrequests"),
                              ("/cryptoki/mysigningpolicies", "mysigningpolicies")):
            if path.endswith(suffix):
                return route
        return "other"
    return {
        "/api/timestamp": "timestamp", "/api/healthz": "healthz", "/api/readyz": "readyz", "/api/metrics": "metrics",
        "/api/swagger/v1/swagger.json": "openapi", "/api/openapi.json": "openapi",
    }.get(path, "other")


_SIGNING_COUNTERS: dict[tuple[str, ...], Counter] = {}


def count_signing_request(entry: AuditEntry) -> None:
    """One signing request, once its audit record is settled. An unauthenticated caller's project
    and policy are its own words, so they are not labels (each would be a new series)."""
    if entry.user_id is None:
        labels: tuple[str, ...] = ("", "", "", "", entry.outcome)
    else:
        labels = (entry.organization_id or "", entry.project_slug or "", entry.policy_slug or "", entry.algorithm or "",
                  entry.outcome)
    counter = _SIGNING_COUNTERS.get(labels)
    if counter is None:  # bound once per series, as RouteTimer does: labels() takes a lock and builds the key
        counter = _SIGNING_COUNTERS[labels] = SIGNING_REQUESTS.labels(*labels)
    counter.inc()


class ServiceObserver:
    """The audit log's and the signing service's reports, as metrics."""

    def audit_queue(self, depth: int) -> None:
        AUDIT_QUEUE_DEPTH.set(depth)

    def audit_committed(self, seconds: float, ok: bool) -> None:
        AUDIT_COMMIT_SECONDS.observe(seconds)
        if not ok:
            AUDIT_ERRORS.inc()

    def rate_limited(self, organization_id: str) -> None:
        RATE_LIMITED.labels(organization_id).inc()

    def keystore_failed(self, backend: str) -> None:
        KEYSTORE_ERRORS.labels(backend).inc()


def process_exited(pid: int) -> None:
    """Drop the live gauges of a worker that stopped."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        multiprocess.mark_process_dead(pid)


def exposition() -> bytes:
    """Every metric in Prometheus' text format, summed over the service's processes."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)
