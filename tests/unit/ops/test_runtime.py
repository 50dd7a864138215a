"""Runtime tuning: the event loop named in the settings, and collector thresholds set once at start-up."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import uvloop

from service.ops.runtime import GC_THRESHOLDS, event_loop_factory, tune_garbage_collector


@pytest.mark.parametrize(("name", "loop_type"), [("uvloop", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)])
def test_the_named_event_loop_is_built(name: str, loop_type: type) -> None:
    loop = event_loop_factory(name)()
    try:
        assert isinstance(loop, loop_type)
        assert loop.run_until_complete(asyncio.sleep(0, result="ran")) == "ran"
    finally:
        loop.close()


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)
    gc.unfreeze()


@pytest.mark.usefixtures("restored_gc")
def test_tuning_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    tune_garbage_collector()

    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > 0
    # Still a collector: a young reference cycle is reclaimed by the next collection.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect(0) >= 1
