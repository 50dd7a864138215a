"""What both APIs' requests share: JSON bodies and URL path segments that a producer's value cannot break."""

from __future__ import annotations

from urllib.parse import quote

import orjson

from service.core.errors import RouteError


def segment(value: str) -> str:
    """`value` as one URL path segment."""
    # An id comes from a producer we do not control: never let it add path segments or a query to the URL.
    check_segment(value)
    return quote(value, safe="")


def check_segment(value: str) -> None:
    if value in (".", ".."):
        # Unreserved characters, so quoting keeps them, and both HTTP clients remove dot segments
        # (even percent-encoded ones): ".." would POST to {base}/data-stream. No id can be one.
        raise RouteError(
            f"pipeline id {value!r} is not an id: in a URL path it is a dot segment, which HTTP clients remove",
            reason="invalid-field",
        )


def to_json(body: object, *, sort_keys: bool = False) -> bytes:
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS if sort_keys else None)
    except TypeError as exc:  # orjson raises TypeError for values JSON cannot carry
        raise RouteError(f"the body cannot be serialised as JSON: {exc}", reason="unserialisable") from exc
