"""The bench's report: the figures as one JSON-ready dict, the targets they meet, and the printed table."""

from __future__ import annotations

from typing import Any

from .harness import OTHER_CPU, PHASES, SERVICE_CPU, Bench
from .refs import RAW_CLIENT_KEYS, Rate

TARGETS: tuple[tuple[str, str], ...] = (
    ("inferences: service CPU >= 0.90 of its core", "inference_cpu"),
    ("inference_ratio >= 0.45 (rows / decode-only, wall)", "inference_ratio"),
    ("row_updates >= 1.5 x raw aiohttp (wall)", "update_ratio"),
    ("row_updates >= 0.7 x the service client's raw loop", "updates_vs_raw_client"),
    ("row_updates_per_s >= 5 x raw_httpx_per_s", "updates_vs_httpx"),
    ("row_updates_per_s_50ms >= 0.9 x row_updates_per_s", "latency_hiding"),
    ("p99_ms <= 250 at half load", "p99_ms"),
    ("peak_rss_mib <= 250", "peak_rss_mib"),
    ("tracing share <= 0.15 (100% sampling, updates)", "tracing_share"),
)
"""The figures `make bench` is held to (docs/performance.md); the first four and the 50 ms one are issue 10's."""
TRACING_TARGET = 0.15
"""The most of the row-update throughput tracing at 100% sampling may cost (share = 1 - traced / untraced)."""
SPANS_PER_UPDATE = 2
"""A delivered row update makes its record's span and one span per HTTP attempt."""


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


RATIOS: tuple[tuple[str, str, str, str], ...] = (
    ("inference_ratio", "inferences", "decode_only_per_s", "inferences / fastavro decode"),
    ("update_ratio", "row_updates", "raw_http_per_s", "row_updates / raw aiohttp (update_ratio)"),
    ("row_updates_vs_raw_pyreqwest", "row_updates", "raw_pyreqwest_per_s", "row_updates / raw pyreqwest"),
    ("row_updates_vs_raw_httpx", "row_updates", "raw_httpx_per_s", "row_updates / raw httpx"),
    ("row_updates_50ms_vs_0ms", "row_updates_50ms", "row_updates", "row_updates_50ms / row_updates"),
)
"""(figure, numerator, denominator, label): a phase over a reference or over another phase. Each is given
per wall second and, as `<figure>_per_cpu_s`, from the per-CPU-second figures (the service's CPU for a
phase, this process's for a reference), which stay steadier when other work shares the machine."""


def _ratios(http_client: str) -> list[tuple[str, str, str, str]]:
    ratios = list(RATIOS)
    if (key := RAW_CLIENT_KEYS.get(http_client)) is not None:
        label = f"row_updates / raw {http_client}, the service's client"
        ratios.insert(4, ("row_updates_vs_raw_client", "row_updates", key, label))
    return ratios


def tracing_cost(bench: Bench) -> dict[str, Any] | None:
    """Row updates traced at 100% sampling against the same untraced, both means over the same rounds.

    `share` is the throughput lost (1 - on / off, per wall second); `per_cpu_share` the same from the per-CPU-second
    figures, which do not flatter a phase whose service got less of its core (other work on the machine). `result`
    is `pass` only when both are within the target. The receiver must have received a span for every record and
    every call, or the figure would be the cost of dropping spans: `result` is then `incomplete`.
    """
    off, on = bench.results.get("row_updates"), bench.results.get("row_updates_traced")
    if off is None or on is None or off.calls <= 1 or on.calls <= 1:
        return None
    share = 1 - on.rate / off.rate if off.rate else None
    per_cpu_share = 1 - on.per_cpu_s / off.per_cpu_s if off.per_cpu_s else None
    received, expected = on.extra.get("spans_received", 0), SPANS_PER_UPDATE * on.done
    if received < expected:
        result = "incomplete"
    elif share is not None and per_cpu_share is not None and max(share, per_cpu_share) <= TRACING_TARGET:
        result = "pass"
    else:
        result = "below-target"
    return {
        "off": off.rate,
        "on": on.rate,
        "share": share,
        "target": TRACING_TARGET,
        "per_cpu_share": per_cpu_share,
        "off_per_cpu_s": off.per_cpu_s,
        "on_per_cpu_s": on.per_cpu_s,
        "spans_received": received,
        "spans_expected_at_least": expected,
        "result": result,
    }


def tracing_line(bench: Bench) -> str:
    """`tracing_cost updates off=... on=... share=... target=0.15 per_cpu_share=... spans_received=... result=...`"""
    cost = tracing_cost(bench)
    if cost is None:
        return "tracing_cost updates not measured"
    return (
        f"tracing_cost updates off={cost['off']:.0f} on={cost['on']:.0f} share={num(cost['share'], 2)} "
        f"target={cost['target']:.2f} per_cpu_share={num(cost['per_cpu_share'], 2)} "
        f"spans_received={cost['spans_received']} (at least {cost['spans_expected_at_least']}) result={cost['result']}"
    )


def summary(bench: Bench, references: dict[str, Rate | None], http_client: str) -> dict[str, Any]:
    r = bench.results
    rate = {name: (res.rate if name in r and (res := r[name]).calls > 1 else None) for name in PHASES}
    latency = r["latency"].extra if "latency" in r else {}
    inference = r.get("inferences")
    figures: dict[str, Any] = {
        "inferences_per_s": rate["inferences"],
        "row_updates_per_s": rate["row_updates"],
        "row_updates_traced_per_s": rate["row_updates_traced"],
        "log_updates_per_s": rate["log_updates"],
        "row_updates_per_s_50ms": rate["row_updates_50ms"],
        "p50_ms": latency.get("p50_ms"),
        "p99_ms": latency.get("p99_ms"),
        "peak_rss_mib": inference.peak_rss_mib if inference else None,
        "rss_backlog_records": inference.expected if inference else None,
        "rss_backlog_drained": inference.drained if inference else None,
        **{key: None if ref is None else ref.per_s for key, ref in references.items()},
    }
    figures["latency_rate_per_s"] = r["latency"].rate if "latency" in r else None
    figures["latency_max_ms"] = latency.get("max_ms")
    figures["per_service_cpu_s"] = {name: round(res.per_cpu_s, 1) for name, res in r.items() if name != "latency"}
    figures["references_per_cpu_s"] = {
        key: round(ref.per_cpu_s, 1) for key, ref in references.items() if ref is not None
    }
    figures["references_cpu_util"] = {key: round(ref.cpu_util, 3) for key, ref in references.items() if ref is not None}
    figures["row_updates_vs_raw_client"] = figures["row_updates_vs_raw_client_per_cpu_s"] = None  # unknown client
    wall = {**{name: rate[name] for name in PHASES}, **figures}
    per_cpu = {**figures["per_service_cpu_s"], **figures["references_per_cpu_s"]}
    for name, numerator, denominator, _ in _ratios(http_client):
        figures[name] = _ratio(wall.get(numerator), wall.get(denominator))
        figures[f"{name}_per_cpu_s"] = _ratio(per_cpu.get(numerator), per_cpu.get(denominator))
    figures["row_updates_vs_raw_aiohttp"] = figures["update_ratio"]
    figures["row_updates_vs_raw_aiohttp_per_cpu_s"] = figures["update_ratio_per_cpu_s"]
    figures["round_rates"] = {name: res.extra["round_rates"] for name, res in r.items() if "round_rates" in res.extra}
    figures["round_service_cpu_util"] = {
        name: res.extra["round_service_cpu_util"] for name, res in r.items() if "round_service_cpu_util" in res.extra
    }
    figures["service_log_problems"] = {name: res.log_problems for name, res in r.items()}
    figures["service_cpu_util"] = {name: round(res.service_cpu_util, 3) for name, res in r.items()}
    figures["service_peak_threads"] = {
        name: res.extra["peak_threads"] for name, res in r.items() if "peak_threads" in res.extra
    }
    figures["sink_cpu_util"] = {name: round(res.sink_cpu_util, 3) for name, res in r.items() if name != "latency"}
    figures["tracing_cost"] = tracing_cost(bench)
    figures["targets_met"] = _targets(figures)
    return figures


def _targets(f: dict[str, Any]) -> dict[str, bool | None]:
    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    def at_most(value: float | None, bound: float) -> bool | None:
        return None if value is None else value <= bound

    return {
        "inference_cpu": at_least(f["service_cpu_util"].get("inferences"), 0.90),
        "inference_ratio": at_least(f["inference_ratio"], 0.45),
        "update_ratio": at_least(f["update_ratio"], 1.5),
        "updates_vs_raw_client": at_least(f["row_updates_vs_raw_client"], 0.7),
        "updates_vs_httpx": at_least(f["row_updates_vs_raw_httpx"], 5.0),
        "latency_hiding": at_least(f["row_updates_50ms_vs_0ms"], 0.9),
        "p99_ms": at_most(f["p99_ms"], 250.0),
        "peak_rss_mib": at_most(f["peak_rss_mib"], 250.0),
        "tracing_share": None if (cost := f["tracing_cost"]) is None else cost["result"] == "pass",
    }


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(bench: Bench, figures: dict[str, Any], machine: dict[str, Any]) -> str:
    o = bench.o
    lines = [
        "",
        "== inference-bridge bench ==",
        f"machine: {machine['cpu']} x{machine['cores']}, Python {machine['python']}, "
        f"load avg {machine['load_start']} -> {machine['load_end']}",
        f"service pinned to core {SERVICE_CPU if bench.pinning else '-'} "
        f"(sink{'' if machine['external_broker'] else ', broker'}"
        f" and bench on core {OTHER_CPU if bench.pinning else '-'}); http client: {figures['http_client']};"
        f" event loop (service and references): {figures['event_loop']};"
        f" {o.partitions} partitions/topic; max_connections {o.concurrency}; overrides: {o.overrides or 'none'}",
        "throughput = sink's first-to-last request of the phase; 'per CPU-s' = that over the service's CPU use",
        "",
        f"{'phase':<18}{'records':>10}{'done':>10}{'calls':>9}{'window s':>9}{'rate':>10} {'unit':<8}"
        f"{'svc CPU':>8}{'per CPU-s':>11}{'sink CPU':>9}{'drained s':>10}{'RSS MiB':>9}",
    ]
    for name, res in bench.results.items():
        if name == "latency":
            continue
        lines.append(
            f"{name:<18}{res.expected:>10,}{res.done:>10,}{res.calls:>9,}{res.window_s:>9.1f}{res.rate:>10,.0f} "
            f"{res.unit:<8}{100 * res.service_cpu_util:>7.0f}%{res.per_cpu_s:>11,.0f}{100 * res.sink_cpu_util:>8.0f}%"
            f"{num(res.drain_s, 1) if res.drained else 'NO':>10}{res.peak_rss_mib:>9.0f}"
            + ("  (capped by time)" if res.capped else "")
            + (
                "  (mean of rounds: "
                + ", ".join(
                    f"{num(v)} at {100 * c:.0f}% CPU"
                    for v, c in zip(rates, res.extra.get("round_service_cpu_util", []), strict=False)
                )
                + ")"
                if (rates := res.extra.get("round_rates"))
                else ""
            )
            + (f"  ({res.log_problems} warning lines in the service log)" if res.log_problems else "")
        )
    if "latency" in bench.results:
        lat = bench.results["latency"]
        x = lat.extra
        lines.append(
            f"{'latency':<18}{lat.expected:>10,}{lat.done:>10,}{lat.calls:>9,}{lat.window_s:>9.1f}{lat.rate:>10,.0f} "
            f"{'calls/s':<8}{100 * lat.service_cpu_util:>7.0f}%   p50 {num(x.get('p50_ms'), 1)} ms, "
            f"p99 {num(x.get('p99_ms'), 1)} ms, max {num(x.get('max_ms'), 1)} ms"
            + (f"  ({lat.log_problems} warning lines in the service log)" if lat.log_problems else "")
        )
    lines += [
        "",
        f"references (this process on core {SERVICE_CPU if bench.pinning else '-'}, no Kafka, "
        f"{o.concurrency} concurrent calls, same sink):",
    ]
    for key, label in (
        ("decode_only_per_s", "fastavro decode of the inference records"),
        ("raw_http_per_s", "aiohttp ClientSession"),
        ("raw_pyreqwest_per_s", "pyreqwest Client"),
        ("raw_httpx_per_s", "httpx AsyncClient"),
        ("httpx_over_aiohttp_per_s", "httpx API over httpx-aiohttp transport"),
        ("bridge_aiohttp_client_per_s", "service.http.client.AiohttpClient"),
        ("bridge_pyreqwest_client_per_s", "service.http.reqwest.PyreqwestClient"),
        ("bridge_httpx_client_per_s", "service.http.client.HttpxClient"),
    ):
        value = figures.get(key)
        per_cpu = figures["references_per_cpu_s"].get(key)
        cpu = figures["references_cpu_util"].get(key)
        text = (
            "not measured"
            if value is None
            else f"{value:>10,.0f} /s  CPU {100 * (cpu or 0):>3.0f}%  {num(per_cpu):>10} per CPU-s"
        )
        taken = figures.get("reference_samples_per_s", {}).get(key, [])
        if len(taken) > 1:
            text += "  (mean of " + ", ".join(num(v) for v in taken) + ")"
        lines.append(f"  {label:<44}{text}")
    lines += [
        "",
        "ratios: per wall second, and from per-CPU-second figures (service CPU for a phase, this process's for"
        " a reference)",
    ]
    for name, *_, label in _ratios(figures["http_client"]):
        lines.append(f"  {label:<60}{num(figures[name], 2):>8}{num(figures[f'{name}_per_cpu_s'], 2):>10}")
    lines += ["", "targets:"]
    values = {
        "inference_cpu": figures["service_cpu_util"].get("inferences"),
        "inference_ratio": figures["inference_ratio"],
        "update_ratio": figures["update_ratio"],
        "updates_vs_raw_client": figures["row_updates_vs_raw_client"],
        "updates_vs_httpx": figures["row_updates_vs_raw_httpx"],
        "latency_hiding": figures["row_updates_50ms_vs_0ms"],
        "p99_ms": figures["p99_ms"],
        "peak_rss_mib": figures["peak_rss_mib"],
        "tracing_share": None if figures["tracing_cost"] is None else figures["tracing_cost"]["share"],
    }
    for label, key in TARGETS:
        met = figures["targets_met"][key]
        verdict = "n/a" if met is None else ("met" if met else "NOT MET")
        lines.append(f"  {label:<52}{num(values[key], 2):>12}  {verdict}")
    lines.append(
        f"  (from per-CPU-s figures: inference_ratio {num(figures['inference_ratio_per_cpu_s'], 2)}, "
        f"update_ratio {num(figures['update_ratio_per_cpu_s'], 2)})"
    )
    lines += ["", tracing_line(bench)]
    return "\n".join(lines)


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3 if abs(value) < 100 else 1)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value
