"""Summarises a py-spy collapsed-stack file: where the service's CPU went, by function.

py-spy's `raw` format is one line per distinct stack, `frame;frame;...;leaf count`, each frame
`function (path:line)`. Lines are folded by function (line numbers dropped) and paths are cut to
their last two parts. Self time is the leaf; inclusive time counts a function once per stack.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>.*?)(?::\d+)?\)$")


@dataclass(frozen=True, slots=True)
class Hotspots:
    samples: int
    self_time: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    parts = match["path"].replace("\\", "/").split("/")
    return f"{match['func']} ({'/'.join(parts[-2:])})"


def summarise(path: Path, top: int = 15) -> Hotspots:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return Hotspots(samples, self_time.most_common(top), inclusive.most_common(top))


def render(title: str, spots: Hotspots) -> str:
    if not spots.samples:
        return f"{title}: no samples"
    lines = [f"{title}: {spots.samples} samples"]
    for heading, rows in (("self", spots.self_time), ("inclusive", spots.inclusive)):
        lines.append(f"  top {heading}:")
        lines.extend(f"    {100 * n / spots.samples:5.1f}%  {name}" for name, n in rows)
    return "\n".join(lines)
