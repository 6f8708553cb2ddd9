"""``Metrics``: one server's Prometheus metrics, fed by the engine's notices.

Rules of this module:

* One ``CollectorRegistry`` per ``Server``, never the global default one: several servers
  may live in one process (tests, embedding programs), and each scrape shows its own.
  With ``--workers N`` every process has its own registry; a scrape reaches one of them.
* Counters and histograms move on notices (``RequestCompleted``, ``FirstTokenSent``,
  ``UsageReported``, ``ProviderFailed``, ``WebSocketClosed``, ``ConnectionFailed``), so
  nothing is done per token. Gauges (connections, WebSockets, streams, jobs) are read from
  the live server at scrape time, so they cannot drift when a socket dies unannounced.
* Labels are bounded: routes are endpoint names, statuses HTTP codes, and at most
  ``MAX_MODELS`` model names are kept apart (later ones are counted as ``other``), since a
  client picks the model name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from wirechat.engine.events import (
    ConnectionFailed,
    FirstTokenSent,
    ProviderFailed,
    RequestCompleted,
    UsageReported,
    WebSocketClosed,
)

if TYPE_CHECKING:
    from .server import Server

MAX_MODELS = 100
# Requests last from milliseconds (a health check) to minutes (a long stream).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WS_ENDPOINTS = ("chat", "predict")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server: Server) -> None:
        self.registry = registry = CollectorRegistry()
        self._requests = Counter(
            "wirechat_requests",
            "HTTP requests answered, by endpoint and status (101: a WebSocket upgrade).",
            ["route", "status"],
            registry=registry,
        )
        self._latency = Histogram(
            "wirechat_request_duration_seconds",
            "Time from a request's head to the end of its response, by endpoint.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._ttft = Histogram(
            "wirechat_time_to_first_token_seconds",
            "Time from a streamed completion's request (or a /chat message) to its first"
            " content, by endpoint (chat_completions, chat_ws).",
            ["route"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self._prompt_tokens = Counter(
            "wirechat_prompt_tokens",
            "Prompt tokens the providers reported, by model.",
            ["model"],
            registry=registry,
        )
        self._completion_tokens = Counter(
            "wirechat_completion_tokens",
            "Completion tokens the providers reported, by model.",
            ["model"],
            registry=registry,
        )
        self._provider_errors = Counter(
            "wirechat_provider_errors",
            "Failed model calls, by provider, model and upstream status (504: timed out).",
            ["provider", "model", "status"],
            registry=registry,
        )
        self._protocol_errors = Counter(
            "wirechat_protocol_errors",
            "Connections refused or closed for breaking HTTP (bad or oversized heads,"
            " bodies over the limit, timeouts), by the status answered.",
            ["status"],
            registry=registry,
        )
        self._ws_sessions = Counter(
            "wirechat_websocket_sessions",
            "WebSocket sessions ended, by endpoint (chat, predict).",
            ["endpoint"],
            registry=registry,
        )
        for endpoint in _WS_ENDPOINTS:
            self._ws_sessions.labels(endpoint)
        registry.register(_LiveCollector(server))
        self._server = server
        self._models: set[str] = set()
        # labels() takes a lock and validates every call: the children used per request
        # are kept here instead, keyed by their label values.
        self._request_children: dict[tuple[str, str], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}
        self._ttft_children: dict[str, Histogram] = {}
        # Per model (at most MAX_MODELS + "other"): (prompt, completion) token counters.
        self._token_children: dict[str, tuple[Counter, Counter]] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- notices -------------------------------------------------------------------------

    def request_completed(self, done: RequestCompleted) -> None:
        key = (done.route, str(done.status))
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self._requests.labels(*key)
        counter.inc()
        if done.status != 101:  # an upgrade's "duration" is the socket's, logged at its end
            latency = self._latency_children.get(done.route)
            if latency is None:
                latency = self._latency_children[done.route] = self._latency.labels(done.route)
            latency.observe(done.duration)

    def first_token_sent(self, sent: FirstTokenSent) -> None:
        ttft = self._ttft_children.get(sent.route)
        if ttft is None:
            ttft = self._ttft_children[sent.route] = self._ttft.labels(sent.route)
        ttft.observe(sent.waited)

    def usage_reported(self, usage: UsageReported) -> None:
        model = self._model(usage.model)
        counters = self._token_children.get(model)
        if counters is None:
            counters = self._token_children[model] = (
                self._prompt_tokens.labels(model),
                self._completion_tokens.labels(model),
            )
        if usage.prompt_tokens > 0:
            counters[0].inc(usage.prompt_tokens)
        if usage.completion_tokens > 0:
            counters[1].inc(usage.completion_tokens)

    def provider_failed(self, failed: ProviderFailed) -> None:
        provider, model = "none", failed.model
        if model:
            try:
                provider = self._server.providers.resolve(model).name
            except Exception:  # no provider serves it (a 404): the client's made-up name
                model = "unknown"
        else:
            provider = model = "all"  # the model listing
        self._provider_errors.labels(provider, self._model(model), str(failed.status)).inc()

    def connection_failed(self, failed: ConnectionFailed) -> None:
        self._protocol_errors.labels(str(failed.status or 0)).inc()

    def websocket_closed(self, closed: WebSocketClosed) -> None:
        self._ws_sessions.labels(closed.endpoint).inc()

    def _model(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model


class _LiveCollector(Collector):
    """Gauges read from the running server when scraped."""

    def __init__(self, server: Server) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        connections = list(self._server.connections)
        open_conns = GaugeMetricFamily(
            "wirechat_connections_open", "Client connections open (HTTP and WebSocket)."
        )
        open_conns.add_metric([], len(connections))
        yield open_conns
        sockets = dict.fromkeys(_WS_ENDPOINTS, 0)
        streams = 0
        for conn in connections:
            engine = conn.engine
            kind = engine.websocket
            if kind is not None:
                sockets[kind] = sockets.get(kind, 0) + 1
            streams += engine.streams
        ws = GaugeMetricFamily(
            "wirechat_websockets_open", "WebSocket sessions open, by endpoint.", labels=["endpoint"]
        )
        for kind, count in sockets.items():
            ws.add_metric([kind], count)
        yield ws
        active = GaugeMetricFamily(
            "wirechat_active_streams",
            "Answers streaming now: SSE responses under way and /chat turns in progress.",
        )
        active.add_metric([], streams)
        yield active
        running, finished = self._server.jobs.counts()
        jobs = GaugeMetricFamily(
            "wirechat_jobs_active",
            "Workflow jobs not finished, by state (starting: waiting for a slot).",
            labels=["state"],
        )
        for state, count in running.items():
            jobs.add_metric([state], count)
        yield jobs
        done = CounterMetricFamily(
            "wirechat_jobs_finished",
            "Workflow jobs finished, by final state (completed, failed, cancelled).",
            labels=["state"],
        )
        for state, count in finished.items():
            done.add_metric([state], count)
        yield done


__all__ = ["MAX_MODELS", "Metrics"]
