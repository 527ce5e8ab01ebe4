"""Optional OpenTelemetry tracing: ``PIE_OTEL_ENABLED=true`` (off by default) with the extra
``pip install 'pie-server[otel]'``.

Every request becomes a server span (opentelemetry-instrumentation-fastapi) named after its
route template, carrying PIE's request id. Spans go to the tracer provider already installed in
the process (``opentelemetry-instrument pie serve``, or the operator's own set-up); without one,
PIE installs an SDK provider exporting over OTLP/HTTP, configured by the standard ``OTEL_*``
variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ...).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("pie.tracing")

# probes and scrapes would drown the traces
EXCLUDED_URLS = "/metrics,/v2/health/live,/v2/health/ready"


class TracingUnavailable(RuntimeError):
    pass


def _ensure_provider() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return  # configured by the operator (or opentelemetry-instrument)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            "PIE_OTEL_ENABLED=true needs an OTLP exporter: pip install 'pie-server[otel]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": "pie"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


def annotate(request_id: str) -> None:
    """Called by the request middleware (inside the request's span): the span names PIE's
    request id, so a trace and the log lines of one request find each other."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("pie.request_id", request_id)


def instrument(app: Any) -> None:
    """Trace ``app``'s requests (called by ``create_app`` when ``PIE_OTEL_ENABLED``)."""
    try:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError as exc:
        raise TracingUnavailable("PIE_OTEL_ENABLED=true needs OpenTelemetry: pip install 'pie-server[otel]'") from exc
    _ensure_provider()
    FastAPIInstrumentor.instrument_app(app, excluded_urls=EXCLUDED_URLS)
    log.info("OpenTelemetry tracing on")
