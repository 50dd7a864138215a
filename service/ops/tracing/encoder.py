"""OTLP protobuf encoding: ReadableSpans to an `ExportTraceServiceRequest`, the same bytes as the SDK's encoder
writes, at a fraction of its cost (the SDK's builds a message object per field: about 35 µs a span, measured here).
Imported only when tracing is on.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TraceState

from .spans import UNSET, FullUrl, LeanSpan

# opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto; field numbers in the comments.

_Q = struct.Struct("<Q")
_I = struct.Struct("<I")
_D = struct.Struct("<d")
_IDS = struct.Struct(">HQQHQ")  # trace_id (1) and span_id (2) with their tags and lengths: 0a 10 ..., 12 08 ...
_PARENT = struct.Struct(">HQ")  # parent_span_id (4): 22 08 ...
_TIMES = struct.Struct("<BQBQ")  # start (7) and end (8) time, fixed64
_LOW64 = (1 << 64) - 1
_KIND = {kind: b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}  # kind (6): SPAN_KIND_INTERNAL = 1 ...
_FLAGS_LOCAL = b"\x85\x01" + _I.pack(0x100)  # Span.flags (16, fixed32): HAS_IS_REMOTE, as the SDK encodes it
_FLAGS_REMOTE = b"\x85\x01" + _I.pack(0x300)  # HAS_IS_REMOTE | IS_REMOTE (the parent came from elsewhere)
_TAIL_LOCAL, _TAIL_REMOTE = b"\x7a\x00" + _FLAGS_LOCAL, b"\x7a\x00" + _FLAGS_REMOTE  # an unset status (15), flags (16)
_IDS_PARENT = struct.Struct(">HQQHQHQ")  # trace_id (1), span_id (2) and parent_span_id (4), without a trace_state
_PER_KEY = 256
"""Encoded key-value pairs remembered per attribute key: constant values hit, unique ones (url.full) churn alone."""


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n < 0x200000:
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int_key_value(tag: int, known: list[Any], value: int) -> bytes:
    """A KeyValue{key (1), value (2): AnyValue{int_value (3)}} field numbered by `tag`: all but the value's varint is
    the same for every value whose varint has the same length, and is remembered in `known[3]` by that length."""
    varint = _varint(value & 0xFFFFFFFFFFFFFFFF)
    prefix: bytes = known[3][len(varint)]
    if not prefix:
        body = known[0] + bytes((0x12, len(varint) + 1, 0x18))
        prefix = known[3][len(varint)] = bytes((tag,)) + _varint(len(body) + len(varint)) + body
    return prefix + varint


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field; `tag` is (number << 3) | 2, below 128."""
    n = len(payload)
    if n < 0x80:  # most attributes: a one-byte length
        return bytes((tag, n)) + payload
    return bytes((tag,)) + _varint(n) + payload


def _any(value: Any) -> bytes:
    """An AnyValue (1 string, 2 bool, 3 int, 4 double, 5 array, 7 bytes)."""
    if isinstance(value, str):
        return _field(0x0A, value.encode("utf-8", "replace"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, float):
        return b"\x21" + _D.pack(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any(v)) for v in value))
    return _field(0x0A, str(value).encode("utf-8", "replace"))


class Encoder:
    """ReadableSpans to an OTLP `ExportTraceServiceRequest`, the same bytes as the SDK's encoder writes.

    What repeats is encoded once and remembered: span names, and key-value pairs with str and int values (per key,
    at most `_PER_KEY` values, so unique values such as url.full churn only their own key's entries). Other values
    take the general path (a mapping as a value, which this service never sets, is written as its str).
    tests/unit/ops/tracing/test_tracing.py compares the output with the SDK's `encode_spans`.
    """

    def __init__(self) -> None:
        # tag -> key -> [encoded key, its values encoded by value (None: not cached), ...] (see `_pair`)
        self._keys: dict[int, dict[str, list[Any]]] = {}
        self._span_keys: dict[str, list[Any]] = self._keys.setdefault(0x4A, {})  # Span.attributes (9)
        self._names: dict[str, bytes] = {}
        self._shared: dict[int, tuple[Mapping[str, Any], str, SpanKind, bytes, bytes]] = {}
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        self._scopes: dict[int, tuple[InstrumentationScope | None, bytes]] = {}

    def cached_span_values(self, key: str) -> int | None:
        """How many encoded values of the span attribute `key` are remembered; None once it stopped caching them."""
        known = self._keys.get(0x4A, {}).get(key)
        if known is None:
            return 0
        values: dict[Any, bytes] | None = known[1]
        return None if values is None else len(values)

    def _attributes(self, tag: int, attributes: Mapping[str, Any] | None) -> bytes:
        """Repeated KeyValue{key (1), value (2)} fields numbered by `tag` ((number << 3) | 2)."""
        if not attributes:
            return b""
        keys = self._keys.get(tag)
        if keys is None:
            keys = self._keys[tag] = {}
        pair = self._pair
        return b"".join([pair(keys, tag, key, value) for key, value in attributes.items()])

    def _pair(self, keys: dict[str, list[Any]], tag: int, key: str, value: Any) -> bytes:
        """One KeyValue field numbered by `tag`; `keys` is that tag's cache."""
        known = keys.get(key)
        if known is None:
            # [encoded key, encoded key-values by value (None: not cached), times that cache filled up,
            #  the encoding of an int key-value up to its varint, by the varint's length]
            known = keys[key] = [_field(0x0A, key.encode("utf-8", "replace")), {}, 0, [b""] * 11]
        kind = type(value)
        # bool is an int subclass, not int: it takes the general path.
        if kind is str or kind is int:
            values = known[1]
            if values is not None:
                encoded: bytes | None = values.get(value)
                return encoded if encoded is not None else self._remember(tag, known, value)
            if kind is int:  # not cached (an offset): AnyValue{int_value (3)}, without `_any`'s tests
                return _int_key_value(tag, known, value)
            any_value = _field(0x0A, value.encode("utf-8", "replace"))  # not cached (a URL): AnyValue{string (1)}
        elif kind is FullUrl:  # a call's URL, written out here
            any_value = _field(0x0A, str(value).encode("utf-8", "replace"))
        else:
            any_value = _any(value)
        return _field(tag, known[0] + _field(0x12, any_value))

    @staticmethod
    def _remember(tag: int, known: list[Any], value: str | int) -> bytes:
        """The key-value pair's encoding, kept in its key's cache; a key whose values hardly repeat (an offset, a
        URL) fills its cache three times, then stops caching."""
        encoded = _field(tag, known[0] + _field(0x12, _any(value)))
        values = known[1]
        if len(values) >= _PER_KEY:
            values.clear()
            known[2] += 1
            if known[2] > 2:
                known[1] = None
        else:
            values[value] = encoded
        return encoded

    def _resource(self, resource: Resource) -> bytes:
        known = self._resources.get(id(resource))
        if known is None or known[0] is not resource:
            # ResourceSpans.resource (1) = Resource{attributes (1)}
            body = _field(0x0A, self._attributes(0x0A, resource.attributes))
            known = self._resources[id(resource)] = (resource, body)
        return known[1]

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        known = self._scopes.get(id(scope))
        if known is None or known[0] is not scope:
            # ScopeSpans.scope (1) = InstrumentationScope{name (1), version (2), attributes (3)}
            inner = b""
            if scope is not None:
                inner = _field(0x0A, scope.name.encode())
                if scope.version:
                    inner += _field(0x12, scope.version.encode())
                inner += self._attributes(0x1A, scope.attributes)
            known = self._scopes[id(scope)] = (scope, _field(0x0A, inner))
        return known[1]

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        groups: dict[tuple[int, int], tuple[ReadableSpan, list[bytes]]] = {}
        span_field, lean_field = self._span_field, self._lean_span_field
        owner: object = None
        owned: list[bytes] = []  # the group of the last LeanSpan's owner: a batch has one, as a rule
        for span in spans:
            if type(span) is LeanSpan:
                if span._owner is owner:
                    owned.append(lean_field(span))
                    continue
                owner = span._owner
                where = (id(owner), 0)
            else:
                where = (id(span.resource), id(span.instrumentation_scope))
            group = groups.get(where)
            if group is None:
                group = groups[where] = (span, [])
            if type(span) is LeanSpan:
                owned = group[1]
                owned.append(lean_field(span))
            else:
                group[1].append(span_field(span))
        by_resource: dict[int, tuple[Resource, list[bytes]]] = {}
        for first, encoded in groups.values():
            scope = first.instrumentation_scope
            # ScopeSpans{scope (1), spans (2), schema_url (3)}
            scope_spans = self._scope(scope) + b"".join(encoded)
            if scope is not None and scope.schema_url:
                scope_spans += _field(0x1A, scope.schema_url.encode())
            resource = first.resource
            by_resource.setdefault(id(resource), (resource, []))[1].append(scope_spans)
        out = []
        for resource, scopes in by_resource.values():
            # ResourceSpans{resource (1), scope_spans (2), schema_url (3)}
            body = self._resource(resource) + b"".join(_field(0x12, s) for s in scopes)
            if resource.schema_url:
                body += _field(0x1A, resource.schema_url.encode())
            out.append(_field(0x0A, body))  # ExportTraceServiceRequest.resource_spans (1)
        return b"".join(out)

    def _span_field(self, span: ReadableSpan) -> bytes:
        """ScopeSpans.spans (2): one Span, tag and length included."""
        if type(span) is LeanSpan:
            return self._lean_span_field(span)
        ctx = span.get_span_context()
        if ctx is None:
            raise ValueError(f"span {span.name!r} has no context")
        parent = span.parent
        parts = _head(ctx.trace_id, ctx.span_id, ctx.trace_state, parent.span_id if parent is not None else 0)
        # name (5), kind (6), start (7, fixed64), end (8, fixed64), attributes (9)
        parts += (
            self._name(span.name),
            _KIND[span.kind],
            _TIMES.pack(0x39, span.start_time or 0, 0x41, span.end_time or 0),
            self._attributes(0x4A, span.attributes),
        )
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))  # dropped_attributes_count (10)
        parts += self._events(span)
        parts += self._links(span.links, span.dropped_links)
        parts += (_status(span.status), _FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return _field(0x12, b"".join(parts))

    def _lean_span_field(self, span: LeanSpan) -> bytes:
        """`_span_field` for this package's spans: the same fields, read without ReadableSpan's properties, with
        what a kind of span shares (name, kind and constant attributes) encoded once and the common case (a parent,
        no trace state, no links, no status) in as few steps as there are fields."""
        trace_id, parent_id = span._trace_id, span._parent_id
        if parent_id and not span._state:
            head = _IDS_PARENT.pack(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span._span_id, 0x2208, parent_id)
        else:
            head = b"".join(_head(trace_id, span._span_id, span._state, parent_id))
        # name (5), kind (6) and the constant attributes (9)
        shared = self._shared.get(id(span._base))
        if shared is None or shared[0] is not span._base or shared[1] != span._name or shared[2] is not span._kind:
            shared = self._share(span)
        links, status = span._links, span._status
        if links or status is not UNSET:
            tail = b"".join(self._links(links, links.dropped if isinstance(links, BoundedList) else 0))
            tail += _status(status) + (_FLAGS_REMOTE if parent_id and span._parent_remote else _FLAGS_LOCAL)
        else:
            tail = _TAIL_REMOTE if parent_id and span._parent_remote else _TAIL_LOCAL
        body = b"".join(
            (
                head,
                shared[3],
                _TIMES.pack(0x39, span._start_time, 0x41, span._end_time or 0),
                shared[4],
                self._own_attributes(span),
                tail,
            )
        )
        n = len(body)
        return (bytes((0x12, n)) if n < 0x80 else b"\x12" + _varint(n)) + body

    def _own_attributes(self, span: LeanSpan) -> bytes:
        """attributes (9) of the span's own, in LeanSpan.attributes' order: `key`, `key2` once set, the others."""
        keys = self._span_keys
        encoded = self._pair(keys, 0x4A, span._key, span._value)
        if span._value2 is not None:
            encoded += self._pair(keys, 0x4A, span._key2, span._value2)
        if span._values:
            encoded += self._attributes(0x4A, span._values)
        return encoded

    def _share(self, span: LeanSpan) -> tuple[Mapping[str, Any], str, SpanKind, bytes, bytes]:
        """(base, name, kind, name and kind encoded, base encoded) for spans with `span`'s base, name and kind."""
        if len(self._shared) >= _PER_KEY:
            self._shared.clear()
        base = span._base
        shared = (
            base,
            span._name,
            span._kind,
            self._name(span._name) + _KIND[span._kind],
            self._attributes(0x4A, base),
        )
        self._shared[id(base)] = shared
        return shared

    def _name(self, name: str) -> bytes:
        """name (5), remembered."""
        known = self._names.get(name)
        if known is None:
            if len(self._names) >= _PER_KEY:
                self._names.clear()
            known = self._names[name] = _field(0x2A, name.encode("utf-8", "replace"))
        return known

    def _events(self, span: ReadableSpan) -> list[bytes]:
        """events (11): Event{time (1, fixed64), name (2), attributes (3)}, and dropped_events_count (12)."""
        parts = []
        for event in span.events:
            body = b"\x09" + _Q.pack(event.timestamp) + _field(0x12, event.name.encode())
            body += self._attributes(0x1A, event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, body))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        return parts

    def _links(self, links: Sequence[Link], dropped: int) -> list[bytes]:
        """links (13): Link{trace_id (1), span_id (2), attributes (4), flags (6)}, and dropped_links_count (14)."""
        parts = []
        for link in links:
            lc = link.context
            body = _IDS.pack(0x0A10, lc.trace_id >> 64, lc.trace_id & _LOW64, 0x1208, lc.span_id)
            body += self._attributes(0x22, link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + _I.pack(0x300 if lc.is_remote else 0x100)
            parts.append(_field(0x6A, body))
        if dropped:
            parts += (b"\x70", _varint(dropped))
        return parts


def _head(trace_id: int, span_id: int, trace_state: TraceState | None, parent_span_id: int) -> list[bytes]:
    """trace_id (1), span_id (2), trace_state (3), parent_span_id (4; 0: none)."""
    parts = [_IDS.pack(0x0A10, trace_id >> 64, trace_id & _LOW64, 0x1208, span_id)]
    if trace_state:
        parts.append(_field(0x1A, ",".join(f"{k}={v}" for k, v in trace_state.items()).encode()))
    if parent_span_id:
        parts.append(_PARENT.pack(0x2208, parent_span_id))
    return parts


def _status(status: Status) -> bytes:
    """status (15): Status{message (2), code (3)}, present even when unset (as the SDK writes it)."""
    if status.status_code is StatusCode.UNSET and not status.description:
        return b"\x7a\x00"
    body = _field(0x12, status.description.encode()) if status.description else b""
    if status.status_code.value:
        body += b"\x18" + _varint(status.status_code.value)
    return _field(0x7A, body)


def reference_encode(spans: Sequence[ReadableSpan]) -> bytes:
    """The SDK's own encoding of `spans` (what `Encoder` must agree with)."""
    return encode_spans(spans).SerializePartialToString()  # type: ignore[no-any-return]
