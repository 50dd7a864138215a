"""W3C Trace Context in a record's headers: the producer's `traceparent`/`tracestate`, read as the API's propagator
reads them, cheaply for the plain header almost every producer writes. Imported only when tracing is on."""

from __future__ import annotations

import re
from collections.abc import Sequence

from opentelemetry.trace import (
    SpanContext,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import (
    _TRACECONTEXT_MAXIMUM_TRACESTATE_KEYS,
    _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH,
    _member_pattern,
)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_TRACEPARENT_FORMAT = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
_TRACESTATE_MAX = _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH


Parent = tuple[int, int, int, TraceState | None]
"""A remote parent: (trace id, span id, trace flags, trace state)."""
_PLAIN_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})").fullmatch
"""What almost every producer writes: version 00, nothing after the flags, no blanks. A strict subset of what the
API's propagator accepts, so the general rules are needed only for the rest."""
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16


def producer_parent(headers: Sequence[tuple[str, bytes | None]]) -> Parent | None:
    """The producer's trace from a record's W3C `traceparent`/`tracestate` headers, or None (see
    `producer_context`, which gives it as the API's SpanContext)."""
    traceparent = tracestate = None
    for name, value in headers:
        if name == TRACEPARENT:
            traceparent = value
        elif name == TRACESTATE:
            tracestate = value
    if traceparent is None:
        return None
    plain = _PLAIN_TRACEPARENT(traceparent)
    if plain is not None:
        trace_hex, span_hex, flags_hex = plain.groups()
        if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
            return None
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    else:
        found = _general_traceparent(traceparent)
        if found is None:
            return None
        trace_id, span_id, flags = found
    state = None
    if tracestate is not None and len(tracestate) <= _TRACESTATE_MAX:
        state = _trace_state(tracestate.decode("latin-1"))
    return trace_id, span_id, flags, state


def _trace_state(header: str) -> TraceState:
    """The header as `TraceState.from_header` reads it (a malformed member, a repeated key or too many keys: an empty
    state), without its warning: a producer that writes a malformed `tracestate` on every record would log a line
    for every record."""
    pairs: dict[str, str] = {}
    for member in header.split(","):
        member = member.strip(" \t")  # optional whitespace (RFC 9110, 5.6.3); empty members are allowed
        if not member:
            continue
        match = _member_pattern.fullmatch(member)
        if match is None:
            return TraceState()
        key, value = match.groups()
        if key in pairs:
            return TraceState()
        pairs[key] = value
    if len(pairs) > _TRACECONTEXT_MAXIMUM_TRACESTATE_KEYS:
        return TraceState()
    return TraceState(list(pairs.items()))


def _general_traceparent(traceparent: bytes) -> tuple[int, int, int] | None:
    """The rules of the API's TraceContextTextMapPropagator.extract (its header pattern, the all-zero ids, versions
    00 and ff, the length limit)."""
    if len(traceparent) > _TRACEPARENT_MAX:
        return None
    match = _TRACEPARENT_FORMAT.search(traceparent.decode("latin-1"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16 or version == "ff" or (version == "00" and rest):
        return None
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


def producer_context(headers: Sequence[tuple[str, bytes | None]]) -> SpanContext | None:
    """The producer's span context from a record's W3C `traceparent`/`tracestate` headers, or None.

    The rules of the API's TraceContextTextMapPropagator.extract, without the Context and the non-recording span it
    wraps the result in. Header names are matched exactly, as OpenTelemetry's Kafka instrumentations write and read
    them.
    """
    found = producer_parent(headers)
    if found is None:
        return None
    trace_id, span_id, flags, state = found
    return SpanContext(trace_id, span_id, True, TraceFlags(flags), state)
