"""Tracing ``none``: the worker's plain path carries the trace context without OpenTelemetry spans.

``configure_tracing`` installs one global provider per process, so each case runs in its own interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def _run(body: str) -> dict[str, object]:
    script = "import json\nfrom meltica.live import tracing\n" + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _parts(header: object) -> list[str]:
    assert isinstance(header, str)
    return header.split("-")


def test_a_traced_input_gives_outputs_of_the_same_trace_with_a_new_span_id() -> None:
    out = _run(
        f"""
        tracing.configure_tracing("none")
        parent = [("traceparent", b"00-{TRACE_ID}-{PARENT}-01"), ("tracestate", b"vendor=x")]
        with tracing.consume_span("a.handle t", parent, {{"k": 1}}):
            first = tracing.inject({{}})
            again = tracing.inject({{}})
        with tracing.consume_span("a.handle t", parent):
            second = tracing.inject({{}})
        outside = tracing.inject({{}})
        print(json.dumps({{
            "first": first["traceparent"].decode(), "again": again["traceparent"].decode(),
            "state": first["tracestate"].decode(), "second": second["traceparent"].decode(),
            "outside": sorted(outside), "trace_of_output": tracing.trace_id_of(first),
        }}))
        """
    )
    version, trace_id, span_id, flags = _parts(out["first"])
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert span_id != PARENT and len(span_id) == 16 and int(span_id, 16) != 0
    assert out["again"] == out["first"]  # every output of one handle is a child of the same span
    assert _parts(out["second"])[2] != span_id  # each handle is a new span
    assert out["state"] == "vendor=x"
    assert out["trace_of_output"] == TRACE_ID  # OpenTelemetry reads what the plain path writes
    assert out["outside"] == []  # no current handle: nothing to carry, as with spans


def test_an_input_without_a_valid_trace_starts_a_new_unsampled_one() -> None:
    out = _run(
        f"""
        tracing.configure_tracing("none")
        seen = {{}}
        for name, headers in [
            ("none", None),
            ("empty", []),
            ("zero-trace", [("traceparent", b"00-{"0" * 32}-{PARENT}-01")]),
            ("zero-span", [("traceparent", b"00-{TRACE_ID}-{"0" * 16}-01")]),
            ("version-ff", [("traceparent", b"ff-{TRACE_ID}-{PARENT}-01")]),
            ("garbage", [("traceparent", b"not a trace")]),
        ]:
            with tracing.consume_span("a.handle t", headers):
                seen[name] = tracing.inject({{}})["traceparent"].decode()
        print(json.dumps(seen))
        """
    )
    trace_ids = set()
    for name, header in out.items():
        version, trace_id, span_id, flags = _parts(header)
        assert (version, flags) == ("00", "00"), name
        assert trace_id != TRACE_ID and int(trace_id, 16) != 0 and int(span_id, 16) != 0, name
        trace_ids.add(trace_id)
    assert len(trace_ids) == len(out)  # each untraced input starts its own trace


def test_other_exporters_keep_real_spans() -> None:
    out = _run(
        f"""
        tracing.configure_tracing("memory")
        with tracing.consume_span("a.handle t", [("traceparent", b"00-{TRACE_ID}-{PARENT}-01")]):
            header = tracing.inject({{}})["traceparent"].decode()
        spans = tracing.finished_spans()
        print(json.dumps({{"header": header, "spans": [(s.name, format(s.context.span_id, "016x")) for s in spans]}}))
        """
    )
    assert out["spans"] == [["a.handle t", _parts(out["header"])[2]]]
