"""Prometheus metrics, served at ``/metrics``.

Each server owns a :class:`Metrics` with its own ``CollectorRegistry`` (two servers in one
process, as in the tests, never mix their numbers). Request and delivery figures are counted
as they happen; the queue's figures (pending, delivered, dead, oldest pending age) are read
from the queue at scrape time, so they agree with ``registry-trio events status`` and survive
restarts. The whole scrape runs on a worker thread: it touches the disk.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .config import redact_address
from .events.queue import EventQueue

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _ScrapeCollector(Collector):
    """Figures read at scrape time: the queue per sink, and open upload sessions."""

    def __init__(self, uploads: Path, sinks: Sequence[str]) -> None:
        self._uploads = uploads
        # Set once the queue runs (see Metrics.watch_queue); None while events are off.
        self.queue: EventQueue | None = None
        self._sinks = list(sinks)

    def collect(self) -> Iterator[Metric]:
        try:
            uploads = len(os.listdir(self._uploads))
        except FileNotFoundError:
            uploads = 0
        yield GaugeMetricFamily(
            "registry_upload_sessions_open", "Blob upload sessions in progress", value=uploads
        )
        queue = self.queue
        if queue is None:
            return
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "pending": GaugeMetricFamily(
                "registry_events_pending", "Events waiting for delivery", labels=["sink"]
            ),
            "dead": GaugeMetricFamily(
                "registry_events_dead", "Events in the dead-letter store", labels=["sink"]
            ),
            "delivered": CounterMetricFamily(
                "registry_events_delivered", "Events delivered", labels=["sink"]
            ),
            "failed": CounterMetricFamily(
                "registry_events_failed_attempts", "Failed delivery attempts", labels=["sink"]
            ),
            "oldest": GaugeMetricFamily(
                "registry_events_oldest_pending_age_seconds",
                "Age of the oldest pending event",
                labels=["sink"],
            ),
        }
        now = time.time()
        for sink in self._sinks:
            # The scrape runs on a Trio worker thread (see Metrics.render): back to the loop.
            counts = trio.from_thread.run(queue.counts, sink)
            label = [redact_address(sink)]
            families["pending"].add_metric(label, counts.pending)
            families["dead"].add_metric(label, counts.dead)
            families["delivered"].add_metric(label, counts.delivered)
            families["failed"].add_metric(label, counts.failed_attempts)
            oldest = 0.0 if counts.oldest_pending is None else now - counts.oldest_pending
            families["oldest"].add_metric(label, oldest)
        yield from families.values()


class Metrics:
    """The server's metrics; ``multiprocess``: the directory its worker processes share.

    A scrape is answered by whichever worker accepted it, and must report the whole server.
    So in a worker, counters and histograms live in prometheus-client's memory-mapped files
    in that directory (its multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR``,
    which the supervisor sets for its workers), and a scrape sums every worker's files.
    The queue's figures are read from the shared queue, so they need no summing.
    """

    def __init__(
        self, uploads: Path, sinks: Sequence[str] = (), multiprocess: Path | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "registry_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.duration = Histogram(
            "registry_http_request_duration_seconds",
            "HTTP request duration",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter("registry_http_received_bytes", "Request body bytes", registry=r)
        self.bytes_out = Counter("registry_http_sent_bytes", "Response body bytes", registry=r)
        self.commit_batch = Histogram(
            "registry_events_commit_batch_size",
            "Writes committed together by one queue transaction (group commit)",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "registry_events_commit_seconds",
            "Queue commit latency, fsync included",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "registry_events_delivery_latency_seconds",
            "From the event's time to its acknowledged delivery",
            ["sink"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._scraped = _ScrapeCollector(uploads, sinks)
        if multiprocess is None:
            r.register(self._scraped)
            self._exposed = r
        else:
            # What this process counts is in the files; the scrape reads all of them.
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, str(multiprocess))  # type: ignore[no-untyped-call]
            self._exposed.register(self._scraped)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def watch_queue(self, queue: EventQueue) -> None:
        """Report the sinks' figures from ``queue`` from now on."""
        self._scraped.queue = queue

    def observe_request(
        self, route: str, method: str, status: int, received: int, sent: int, seconds: float
    ) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            # labels() takes a lock and builds its key on every call; the children are kept
            # here instead (one entry per label set, which the registry holds anyway).
            children = (
                self.requests.labels(route, method, str(status)),
                self.duration.labels(route, method),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        self.bytes_in.inc(received)
        self.bytes_out.inc(sent)

    def observe_commit(self, writes: int, seconds: float) -> None:
        self.commit_batch.observe(writes)
        self.commit_seconds.observe(seconds)

    def observe_delivered(self, sink: str, latencies: Sequence[float]) -> None:
        histogram = self.delivery_latency.labels(redact_address(sink))
        for latency in latencies:
            histogram.observe(latency)

    async def render(self) -> bytes:
        return await trio.to_thread.run_sync(generate_latest, self._exposed)
