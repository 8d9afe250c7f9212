"""OpenTelemetry traces across the live pipeline: W3C trace context in Kafka headers.

One order is one trace: the market event that made a strategy decide, the intent, the risk decision,
the submission and the fill. Each hop is a span started by the shell (``streams/worker.py``) around
``Processor.handle`` as a child of the context found in the incoming message's headers
(:func:`extract`); the shell writes the current context into every outgoing message's headers
(:func:`inject`) unless the processor already put a ``traceparent`` there. A processor that publishes
later, outside ``handle`` (a fill arriving on the venue's user stream), keeps
:func:`current_headers` of the submission and puts them on the fill so the fill joins the order's trace.

Headers are ``dict[str, bytes]`` (Kafka header values are bytes); :func:`extract` also takes Kafka's
``[(name, bytes), ...]`` list. Exporters (:func:`configure_tracing`): ``none`` (trace and span ids are
still made and propagated, but a trace that starts here is not sampled: its spans record nothing, which
keeps a span per market event cheap — a child of a sampled remote parent is still recorded), ``console``,
``memory`` (tests read :func:`memory_exporter`), ``otlp`` (only when ``opentelemetry-exporter-otlp`` is
installed).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meltica.errors import ConfigurationError

TRACER_NAME = "meltica.live"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
Exporter = Literal["none", "console", "memory", "otlp"]
EXPORTERS: tuple[str, ...] = ("none", "console", "memory", "otlp")

_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_memory: Any = None  # InMemorySpanExporter when configured with "memory"
_configured: str | None = None

HeadersIn = Mapping[str, bytes | str | None] | Iterable[tuple[str, bytes | str | None]] | None


def _as_text_carrier(headers: HeadersIn) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    carrier: dict[str, str] = {}
    for name, value in items:
        if value is None:
            continue
        lowered = name.lower()
        if lowered in (TRACEPARENT, TRACESTATE):
            carrier[lowered] = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return carrier


def extract(headers: HeadersIn) -> Context:
    """The trace context carried by Kafka headers (an empty context when there is none or it is bad)."""
    return _propagator.extract(_as_text_carrier(headers), context=Context())


def inject(headers: dict[str, bytes] | None = None, context: Context | None = None) -> dict[str, bytes]:
    """Write ``context`` (default: the current one) into ``headers`` as W3C ``traceparent``/``tracestate``.

    Returns ``headers`` (a new dict when ``None``); nothing is written when there is no valid span."""
    headers = {} if headers is None else headers
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=context)
    for name, value in carrier.items():
        headers[name] = value.encode("latin-1")
    return headers


def current_headers() -> dict[str, bytes]:
    """Headers for the current span: keep them to attach a later message to this trace."""
    return inject({})


def trace_id_of(headers: HeadersIn) -> str | None:
    """The 32-hex trace id in ``headers`` (``None``: no valid trace context)."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """The pipeline's tracer, looked up once: a proxy until a provider is installed, then that provider's
    (``get_tracer`` per message cost as much as the rest of a span)."""
    global _tracer
    if _tracer is None:
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer


@contextmanager
def consume_span(name: str, headers: HeadersIn, attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A CONSUMER span, child of the headers' context, made current for the block (outputs inherit it)."""
    parent = extract(headers)
    span = tracer().start_span(name, context=parent, kind=SpanKind.CONSUMER, attributes=dict(attributes or {}))
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        otel_context.detach(token)
        span.end()


def configure_tracing(exporter: str = "none", service_name: str = "meltica") -> Any:
    """Install an SDK ``TracerProvider`` with ``exporter`` (once per process; a second call with the same
    exporter is a no-op, a different one is refused — OpenTelemetry allows one global provider)."""
    global _memory, _configured
    if exporter not in EXPORTERS:
        raise ConfigurationError(f"tracing exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    with _lock:
        if _configured is not None:
            if _configured != exporter:
                raise ConfigurationError(f"tracing already configured with {_configured!r}, not {exporter!r}")
            return trace.get_tracer_provider()
        # lazy: the OpenTelemetry SDK (and the optional OTLP exporter) only when tracing is on
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

        # nothing is exported with "none": recording a span per record only cost CPU (~14 % of the
        # market-data worker's, bench/live_pipeline_bench.py); ids are still made, so traces still link up
        sampler = ParentBased(ALWAYS_OFF) if exporter == "none" else None
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
        if exporter == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif exporter == "memory":
            # lazy: the OpenTelemetry SDK (and the optional OTLP exporter) only when tracing is on
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            _memory = InMemorySpanExporter()
            provider.add_span_processor(SimpleSpanProcessor(_memory))
        elif exporter == "otlp":
            try:
                # lazy: the OpenTelemetry SDK (and the optional OTLP exporter) only when tracing is on
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                    OTLPSpanExporter,
                )
            except ImportError:
                raise ConfigurationError(
                    "tracing exporter 'otlp' needs the opentelemetry-exporter-otlp package"
                ) from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _configured = exporter
        return provider


def memory_exporter() -> Any:
    """The ``InMemorySpanExporter`` installed by ``configure_tracing("memory")`` (``None`` otherwise)."""
    return _memory


def finished_spans() -> list[Any]:
    """Spans the memory exporter holds (empty unless tracing is configured with ``memory``)."""
    return list(cast(Any, _memory).get_finished_spans()) if _memory is not None else []
