"""What the dlq command prints: one dead letter as JSON and as text, a topic's summary, everything redacted."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from service.ops.redaction import Redactor
from service.tools.dlq.cli import InspectOptions
from service.tools.dlq.letters import (
    MAX_HEX_BYTES,
    NONE,
    TopicSummary,
    human_age,
    iso_ms,
)
from service.tools.dlq.reader import Report

# --- one dead letter as JSON and as text ------------------------------------------------------------------------


def letter_text(item: Mapping[str, Any], now_ms: int) -> list[str]:
    """A dead letter as `letter_json` made it, for a person."""
    failed = item["failed_at"]
    age = ""
    if failed is not None:
        failed_ms = int(datetime.fromisoformat(failed.replace("Z", "+00:00")).timestamp() * 1000)
        age = f" ({human_age((now_ms - failed_ms) / 1000)} ago)"
    source = item["source"]
    lines = [
        f"--- {item['topic']}[{item['partition']}]@{item['offset']}  reason={item['reason'] or NONE}  "
        f"stage={item['stage'] or NONE}  failed={failed or NONE}{age}",
        f"source:    {source['topic'] or NONE}[{_or_none(source['partition'])}]@{_or_none(source['offset'])}  "
        f"timestamp={item['timestamp']}  key={_bytes_text(item['key'])}",
        f"error:     {item['error']['class'] or NONE}: {item['error']['message'] or NONE}",
    ]
    http = item["http"]
    if http is not None:
        lines.append(
            f"http:      {http['method']} {http['url']} -> {_or_none(http['status'])} "
            f"after {_or_none(http['attempts'])} attempt(s)"
        )
        lines += [f"           response header {k}: {v}" for k, v in http["response_headers"].items()]
        lines.append(f"           response body: {http['response_body'] or ''}")
    lines.append("headers:")
    lines += [f"  {h['name']}: {_bytes_text(h)}" for h in item["headers"]] or ["  (none)"]
    value = item["value"]
    if value["encoding"] == "avro":
        lines.append(f"value:     {value['schema']} ({value['wire_format']} Avro) as JSON:")
        lines += ["  " + line for line in json.dumps(value["datum"], indent=2, ensure_ascii=False).splitlines()]
    elif value["encoding"] == "hex":
        lines.append(f"value:     {value['bytes']} bytes as hex ({value['note']}):")
        shown = value["hex"][: 2 * MAX_HEX_BYTES]
        more = value["bytes"] - len(shown) // 2
        lines.append("  " + shown + (f" ... ({more} more bytes; --json has them all)" if more > 0 else ""))
    else:
        lines.append(f"value:     {value['note']}")
    return lines


def _or_none(value: Any) -> str:
    return NONE if value is None else str(value)


def _bytes_text(value: Mapping[str, Any] | None) -> str:
    if value is None or value.get("null"):  # no key, or a header without a value
        return "null"
    if "hex" in value:
        return f"0x{value['hex']}"
    text: str = value["text"]
    # As it is when that is unambiguous; quoted (JSON) when blanks at the ends or control characters would hide.
    return text if text and text.isprintable() and text == text.strip() else json.dumps(text, ensure_ascii=False)


def summary_text(summary: TopicSummary, now_ms: int, filtered: bool) -> list[str]:
    if not summary.exists:
        return [f"{summary.topic}: does not exist"]
    of = f" (of {summary.read} read)" if filtered else ""
    if not summary.matched:
        return [f"{summary.topic}: no dead letters{' match' if filtered else ''}{of}"]
    head = f"{summary.topic}: {summary.matched} dead letter{'s' if summary.matched != 1 else ''}{of}"
    if summary.oldest_failed_at_ms is not None and summary.newest_failed_at_ms is not None:
        oldest, newest = summary.oldest_failed_at_ms, summary.newest_failed_at_ms
        head += (
            f", failed from {iso_ms(oldest)} ({human_age((now_ms - oldest) / 1000)} ago)"
            f" to {iso_ms(newest)} ({human_age((now_ms - newest) / 1000)} ago)"
        )
    data = summary.to_json()
    rows = [
        ("reason", data["by_reason"]),
        ("stage", data["by_stage"]),
        ("http status", data["by_http_status"]),
        ("source topic", data["by_source_topic"]),
        ("age", data["by_age"]),
    ]
    return [head] + [f"  {name:<13} " + ", ".join(f"{k} {v}" for k, v in counts.items()) for name, counts in rows]


def redact_all(value: Any, redact: Redactor) -> Any:
    """Every string of a JSON-like value through the redactor (before serialising, so escaping cannot hide one)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): redact_all(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_all(v, redact) for v in value]
    return value


def render(report: Report, options: InspectOptions, redact: Redactor) -> str:
    """What the command prints, every string redacted."""
    if options.as_json:
        return json.dumps(redact_all(report.to_json(), redact), ensure_ascii=False, indent=2)
    filtered = bool(options.filter.reasons) or options.filter.since_ms is not None
    lines: list[str] = []
    for summary in report.summaries:
        lines += summary_text(summary, report.now_ms, filtered)
    for item in redact_all(report.letters, redact):
        lines.append("")
        lines += letter_text(item, report.now_ms)
    return "\n".join(redact(line) for line in lines)
