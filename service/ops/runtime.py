"""The Python runtime the service process runs in: its event loop and its garbage collector.

Both are chosen by measurement (`make bench`; docs/performance.md) and set once, at start-up, by
`__main__` before the loop starts; nothing else in the service touches them.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Final

import uvloop

GC_THRESHOLDS: Final = (20_000, 10, 10)
"""Collect the youngest generation after 20,000 net container allocations, not CPython's 700.

Measured on a 300,000-row drain: at the default the collector ran about 4,000 times and took 11%
of the service's CPU on new inferences and about 20% on updates, and collected nothing, because
the steady state makes no reference cycles (records, rows and calls are freed by reference
counting). At 20,000 it ran about 20 times and peak RSS did not change. At 50,000 it never ran,
yet peak RSS of the inference phase rose from about 90 to 225 MiB; that was not explained, so the
threshold stays well below it. Cycles from rare paths (errors, reconnects) are still collected.
"""


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The loop the service runs on; uvloop's scheduling and I/O cost less CPU per record."""
    return uvloop.new_event_loop if name == "uvloop" else asyncio.new_event_loop


def tune_garbage_collector() -> None:
    """Freeze what start-up built (modules, settings) out of every collection, then set the thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
