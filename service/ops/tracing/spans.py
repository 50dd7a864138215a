"""The spans this service makes: `LeanSpan`, the API's `Span` and the SDK's `ReadableSpan` without the SDK span's
lock, attribute validation and bounded containers (every attribute here is a str or an int this package sets), and
`FullUrl`, a call's URL written out only when exported.

The SDK makes a span through `Tracer.start_span` at about 15 µs, measured here; a `LeanSpan` is a handful of slot
assignments, its ids plain ints (the API's SpanContext is made only when asked for). Imported only when tracing is
on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import AnyValue, Attributes

FLAGS = [TraceFlags(bits) for bits in range(4)]
"""By (random trace id << 1) | sampled: a span is sampled or not, and keeps the random-trace-id flag of its trace
(W3C Trace Context level 2), set for the trace ids made here, as the SDK does."""
UNSET = Status(StatusCode.UNSET)
ERROR = Status(StatusCode.ERROR)


class LeanSpan(trace_api.Span, ReadableSpan):
    """A sampled span: a few attribute assignments to make, and one processor call to end.

    Its attributes are `base`, shared by every span of its kind and place (a partition's record spans, an
    endpoint's calls) and never changed, then its own: the one every span of its kind has (`key`: a record's offset,
    a call's URL), the one its end sets (`key2`: a record's outcome, a call's status; absent while None), then any
    others (`values`, None for none), so that a span is one object, not one and a dict: on this service's core what
    a record's tracing costs goes with the objects it touches. The encoder encodes each `base` once. Its ids are
    plain ints: the API's SpanContext (and the parent's) is made only when asked for (a log line, the SDK's own
    encoder), not for every span.
    """

    # Slots for what every span sets: cheaper to set than dict entries. What few spans set (a status, links)
    # are class defaults, overridden in the instance's dict.
    __slots__ = (
        "_base",
        "_ctx",
        "_end_time",
        "_flags",
        "_key",
        "_key2",
        "_kind",
        "_name",
        "_owner",
        "_parent_flags",
        "_parent_id",
        "_parent_remote",
        "_span_id",
        "_start_time",
        "_state",
        "_trace_id",
        "_value",
        "_value2",
        "_values",
    )
    _events: Sequence[Any] = ()
    _instrumentation_info = None
    _links: Sequence[Link] = ()
    _status = UNSET

    def __init__(
        self,
        owner: Owner,
        name: str,
        kind: SpanKind,
        base: Mapping[str, AnyValue],
        key: str,
        value: Any,
        key2: str,
        values: dict[str, Any] | None,
        trace_id: int,
        span_id: int,
        flags: int,
        state: TraceState | None,
        parent_id: int,
        parent_flags: int,
        parent_remote: bool,
        start_time: int,
    ) -> None:
        self._owner = owner
        self._name = name
        self._kind = kind
        self._base = base
        self._key = key
        self._value = value
        self._key2 = key2
        self._value2: Any = None
        self._values = values
        self._trace_id = trace_id
        self._span_id = span_id
        self._flags = flags
        self._state = state
        self._parent_id = parent_id  # 0: none
        self._parent_flags = parent_flags
        self._parent_remote = parent_remote
        self._start_time = start_time
        self._end_time: int | None = None
        self._ctx: SpanContext | None = None

    def get_span_context(self) -> SpanContext:
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = SpanContext(self._trace_id, self._span_id, False, FLAGS[self._flags], self._state)
        return ctx

    # ReadableSpan's properties (what the SDK's exporters read), from this span's own fields.
    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    @property
    def parent(self) -> SpanContext | None:
        if not self._parent_id:
            return None
        flags = TraceFlags(self._parent_flags)
        return SpanContext(self._trace_id, self._parent_id, self._parent_remote, flags, self._state)

    @property
    def resource(self) -> Resource:
        return self._owner.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._owner.scope

    @property
    def dropped_attributes(self) -> int:
        return 0

    @property
    def attributes(self) -> Mapping[str, AnyValue]:
        """In the order the encoder writes them: base, `key`, `key2` (once set), the others."""
        found = dict(self._base)
        found[self._key] = str(self._value) if type(self._value) is FullUrl else self._value
        if self._value2 is not None:
            found[self._key2] = self._value2
        if self._values:
            found.update(self._values)
        return MappingProxyType(found)

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: AnyValue) -> None:
        if key == self._key:
            self._value = value
        elif key == self._key2:
            self._value2 = value
        elif self._values is None:
            self._values = {key: value}
        else:
            self._values[key] = value

    def set_attributes(self, attributes: Mapping[str, AnyValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if isinstance(status, StatusCode):
            status = Status(status, description)
        self._status = status

    def update_name(self, name: str) -> None:
        self._name = name

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        pass  # this service's spans carry no events

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self.set_attribute("error.type", type(exception).__name__)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        self._owner.emit(self)


class Owner:
    """What every span of one `OtelTracing` shares: one reference per span instead of three."""

    __slots__ = ("emit", "resource", "scope")

    def __init__(self, emit: Callable[[ReadableSpan], None], resource: Resource, scope: InstrumentationScope) -> None:
        self.emit = emit
        self.resource = resource
        self.scope = scope


_URL_SAFE = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


class FullUrl:
    """A call's `url.full`, its query written out only when the span is encoded (or its attributes read): on the
    exporter's thread, a batch at a time, rather than on the event loop for every call."""

    __slots__ = ("_params", "_url")

    def __init__(self, url: str, params: Sequence[tuple[str, str]]) -> None:
        self._url = url
        self._params = params

    def __str__(self) -> str:
        # Keys travel in headers only, and URLs with credentials are refused at start-up: no secret here.
        query = "&".join([f"{k}={v if _URL_SAFE(v) else quote(v, safe='')}" for k, v in self._params])
        return f"{self._url}?{query}"

    def __repr__(self) -> str:
        return repr(str(self))
