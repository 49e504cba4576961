"""Metrics and health at ``observability.listen``: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz``.

Nothing here runs per event. The dispatcher only adds to the plain counters of its :class:`~bridge.dispatch.Stats`;
a custom collector turns them into metric families when Prometheus scrapes, together with what is read from the
runtime at that moment (:meth:`~bridge.runtime.Runtime.source_reports`: in-flight events, bindings, state) and
the engine link, plus the figures each kind declares (:attr:`~bridge.sources.KindSpec.figures`: Kafka consumer
lag, Postgres listen gaps and drops), read from its sources through :meth:`~bridge.sources.Source.figures`. Each
runtime has its own registry, never prometheus_client's global one.

The HTTP side is a small asyncio server on the bridge loop: a scrape reads counters and formats a few dozen
lines, and staying on the loop means every value is read where it is written (no locks, no torn reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bridge.dispatch import LATENCY_BUCKETS_S
from bridge.sources import REGISTRY, Figure, Source

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = logging.getLogger("bridge.metrics")

_READ_TIMEOUT_S = 5.0
_TEXT = "text/plain; charset=utf-8"


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) → (host, port); ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{listen!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class _Collector(Collector):
    """Builds every bridge metric family from the runtime's state at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[Metric]:
        rt = self._runtime
        tt = ["trigger_type"]
        received = CounterMetricFamily("bridge_events_received", "Events a source handed to delivery.", labels=tt)
        done = CounterMetricFamily(
            "bridge_events_done",
            "Events done: delivered (every binding succeeded or was filtered), filtered (every binding filtered), "
            "dead_lettered (at least one binding dead-lettered).",
            labels=[*tt, "outcome"],
        )
        deliveries = CounterMetricFamily(
            "bridge_deliveries", "Invocation attempts of bound functions, by result.", labels=[*tt, "outcome"]
        )
        retries = CounterMetricFamily("bridge_retries", "Invocations retried after a failure.", labels=tt)
        dl_failures = CounterMetricFamily(
            "bridge_dead_letter_failures",
            "Dead-letter writes the destination refused (disk full, broker or database down); each is retried "
            "and its event stays unacknowledged meanwhile.",
            labels=tt,
        )
        in_flight = GaugeMetricFamily("bridge_events_in_flight", "Events accepted and not done yet.", labels=tt)
        bindings = GaugeMetricFamily("bridge_bindings", "Functions bound to the trigger type.", labels=tt)
        expired = CounterMetricFamily(
            "bridge_bindings_expired",
            "Stale bindings dropped because the engine did not replay them within engine.rebind_grace_ms of a "
            "reconnect.",
            labels=tt,
        )
        running = GaugeMetricFamily(
            "bridge_source_running", "1 while the source runs, 0 while it waits to be restarted.", labels=tt
        )
        latency = HistogramMetricFamily(
            "bridge_delivery_seconds", "Duration of successful invocations, in seconds.", labels=tt
        )
        figures = {f.name: _family(f) for spec in REGISTRY.values() for f in spec.figures}
        for report in rt.source_reports():
            sid, stats = report.id, report.stats
            label = [sid]
            received.add_metric(label, stats.received)
            done.add_metric([sid, "delivered"], stats.delivered)
            done.add_metric([sid, "filtered"], stats.filtered)
            done.add_metric([sid, "dead_lettered"], stats.dead_lettered)
            deliveries.add_metric([sid, "ok"], stats.deliveries_ok)
            deliveries.add_metric([sid, "error"], stats.deliveries_failed)
            retries.add_metric(label, stats.retries)
            dl_failures.add_metric(label, stats.dead_letter_failures)
            in_flight.add_metric(label, report.in_flight)
            bindings.add_metric(label, report.bindings)
            expired.add_metric(label, report.expired_bindings)
            running.add_metric(label, 1 if report.running else 0)
            latency.add_metric(label, _buckets(list(stats.latency_counts)), stats.latency_sum_s)
            if report.source is not None:
                _source_figures(sid, report.source, figures)
        engine = GaugeMetricFamily("bridge_engine_connected", "1 while the iii engine link is up, else 0.")
        engine.add_metric([], 1 if rt.engine_connected() else 0)
        reloads = CounterMetricFamily(
            "bridge_config_reloads", "Live reloads of the config, by result: applied, or rejected (invalid; the "
            "running config stayed).", labels=["result"],
        )
        reloads.add_metric(["applied"], rt.reloads.applied)
        reloads.add_metric(["rejected"], rt.reloads.rejected)
        last_ok = GaugeMetricFamily(
            "bridge_config_last_reload_successful", "1 if the last reload of the config was applied (or none was "
            "tried yet), 0 if it was rejected.")
        last_ok.add_metric([], 1 if rt.reloads.last_ok else 0)
        last_success = GaugeMetricFamily(
            "bridge_config_last_reload_success_timestamp_seconds",
            "When the running config was taken (Unix time): the start, or the last applied reload.")
        last_success.add_metric([], rt.reloads.last_success_s)
        families: list[Metric] = [
            received, done, deliveries, retries, dl_failures, in_flight, bindings, expired, running, latency
        ]
        families.extend(f for f in figures.values() if f.samples)
        families.extend((engine, reloads, last_ok, last_success))
        return families


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), counts, strict=True):
        total += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out


def _family(figure: Figure) -> GaugeMetricFamily | CounterMetricFamily:
    labels = ["trigger_type", *figure.labels]
    if figure.type == "gauge":
        return GaugeMetricFamily(figure.name, figure.help, labels=labels)
    return CounterMetricFamily(figure.name, figure.help, labels=labels)


def _source_figures(sid: str, source: Source, families: dict[str, GaugeMetricFamily | CounterMetricFamily]) -> None:
    """The figures ``source`` reports, in the families its kind declared (sorted by label values); a failing
    reader costs its own figures, never the scrape."""
    try:
        reported = {name: sorted(samples) for name, samples in source.figures().items()}
    except Exception as exc:
        log.debug("figures of %s unavailable: %s", sid, exc)
        return
    for name, samples in reported.items():
        family = families.get(name)
        if family is None:
            log.debug("source %s reports %s, which no kind declares; not exported", sid, name)
            continue
        for labels, value in samples:
            family.add_metric([sid, *(str(v) for v in labels)], value)


class MetricsServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` for one runtime."""

    def __init__(self, runtime: Runtime, listen: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(runtime))
        ProcessCollector(registry=self.registry)
        self._readiness: Callable[[], tuple[bool, str]] = runtime.readiness
        self._mode: Callable[[], str | None] = runtime.engine_mode
        self._listen = listen
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (port 0 in the config picks a free one). Raises OSError."""
        host, port = parse_listen(self._listen)
        self._server = await asyncio.start_server(self._serve, host or None, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        shown = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        log.info("serving /metrics, /healthz and /readyz on http://%s:%d", shown, self.address[1])
        return self.address

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=2)

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) of one request."""
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            ready, reason = self._readiness()
            if not ready:
                return 503, _TEXT, f"not ready: {reason}\n".encode()
            mode = self._mode()
            return 200, _TEXT, (f"ready ({mode} mode)\n" if mode else "ready\n").encode()
        return 404, _TEXT, b"not found; try /metrics, /healthz or /readyz\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(request_line) != 3:
                status, content_type, body = 400, _TEXT, b"bad request\n"
                method = "GET"
            else:
                method, target = request_line[0], request_line[1]
                status, content_type, body = self.respond(method, target.split("?", 1)[0])
            reason = _REASONS.get(status, "")
            header = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(header.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that hung up or never finished its request: nothing to answer
        except Exception:
            log.exception("metrics endpoint: unexpected error while answering a request")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
