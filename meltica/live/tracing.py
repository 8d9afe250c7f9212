"""OpenTelemetry traces across the live pipeline: W3C trace context in Kafka headers.

One order is one trace: the market event that made a strategy decide, the intent, the risk decision,
the submission and the fill. Each hop is a span started by the shell (``streams/worker.py``) around
``Processor.handle`` as a child of the context found in the incoming message's headers
(:func:`extract`); the shell writes the current context into every outgoing message's headers
(:func:`inject`) unless the processor already put a ``traceparent`` there. A processor that publishes
later, outside ``handle`` (a fill arriving on the venue's user stream), keeps
:func:`current_headers` of the submission and puts them on the fill so the fill joins the order's trace.

With ``none`` the worker takes a shorter path (:func:`consume_span`): no OpenTelemetry span is made at all; the
incoming ``traceparent`` is carried to the outputs with the same trace id and flags and a new span id (a new
trace id for an input without one), which is all an unexported trace needs, at a fraction of a span's cost.

Headers are ``dict[str, bytes]`` (Kafka header values are bytes); :func:`extract` also takes Kafka's
``[(name, bytes), ...]`` list. Exporters (:func:`configure_tracing`): ``none`` (trace and span ids are
still made and propagated, nothing is recorded: see above), ``console``,
``memory`` (tests read :func:`memory_exporter`), ``otlp`` (only when ``opentelemetry-exporter-otlp`` is
installed).
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
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
_plain = False  # configured with "none": trace context carried as header text, no OpenTelemetry spans
# the (traceparent, tracestate) of the input being handled, on the plain path
_plain_current: ContextVar[_PlainSpan | None] = ContextVar("meltica_trace_plain", default=None)
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_INVALID_TRACE = "0" * 32
_INVALID_SPAN = "0" * 16

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
    if _plain and context is None:
        current = _plain_current.get()
        if current is not None:
            parent, state = current.child()
            headers[TRACEPARENT] = parent
            if state is not None:
                headers[TRACESTATE] = state
            return headers
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
    """A CONSUMER span, child of the headers' context, made current for the block (outputs inherit it).
    Tracing ``none``: no span (the block gets the invalid span); the headers' trace goes on to the outputs."""
    if _plain:
        plain_token = _plain_current.set(_PlainSpan(headers))
        try:
            yield trace.INVALID_SPAN
        finally:
            _plain_current.reset(plain_token)
        return
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


def records_spans() -> bool:
    """False on the plain path (tracing ``none``): span attributes would be thrown away, so skip making them."""
    return not _plain


class _PlainSpan:
    """The handle of one input on the plain path; its outputs' trace context is made on the first output
    (most market events produce none)."""

    __slots__ = ("_child", "_headers")

    def __init__(self, headers: HeadersIn) -> None:
        self._headers = headers
        self._child: tuple[bytes, bytes | None] | None = None

    def child(self) -> tuple[bytes, bytes | None]:
        if self._child is None:
            self._child = _plain_child(self._headers)
        return self._child


def _plain_child(headers: HeadersIn) -> tuple[bytes, bytes | None]:
    """The ``traceparent`` (and ``tracestate``) an output of an input with ``headers`` carries on the plain path:
    the input's trace id and flags with a new span id, as a child span would have; a new unsampled trace
    when the input has no valid one (the W3C rules :class:`TraceContextTextMapPropagator` applies)."""
    carrier = _as_text_carrier(headers)
    match = _TRACEPARENT_RE.fullmatch(carrier.get(TRACEPARENT, "").strip())
    span_id = _nonzero_hex(64)
    if match is not None:
        version, trace_id, parent_span, flags, rest = match.groups()
        valid = (
            version != "ff"
            and not (version == "00" and rest)
            and trace_id != _INVALID_TRACE
            and parent_span != _INVALID_SPAN
        )
        if valid:
            state = carrier.get(TRACESTATE)
            # the W3C format says 00: only the sampled bit of the flags is carried (as OpenTelemetry does)
            sampled = "01" if int(flags, 16) & 1 else "00"
            return f"00-{trace_id}-{span_id}-{sampled}".encode(), state.encode("latin-1") if state else None
    return f"00-{_nonzero_hex(128)}-{span_id}-00".encode(), None


def _nonzero_hex(bits: int) -> str:
    value = 0
    while not value:
        value = random.getrandbits(bits)
    return format(value, f"0{bits // 4}x")


def configure_tracing(exporter: str = "none", service_name: str = "meltica") -> Any:
    """Install an SDK ``TracerProvider`` with ``exporter`` (once per process; a second call with the same
    exporter is a no-op, a different one is refused — OpenTelemetry allows one global provider)."""
    global _memory, _configured, _plain
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
        _plain = exporter == "none"
        return provider


def memory_exporter() -> Any:
    """The ``InMemorySpanExporter`` installed by ``configure_tracing("memory")`` (``None`` otherwise)."""
    return _memory


def finished_spans() -> list[Any]:
    """Spans the memory exporter holds (empty unless tracing is configured with ``memory``)."""
    return list(cast(Any, _memory).get_finished_spans()) if _memory is not None else []
