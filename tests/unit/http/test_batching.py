"""Batcher: rows close into batches by count, bytes and linger; batches of one key go out in parallel;
a refused batch is bisected so that only the rows refused on their own fail."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Sequence

import pytest

from service.core.errors import HttpEvidence, RejectedError
from service.http.batching import Batcher


class FakeApi:
    """Records each flush; refuses any batch holding a row in `bad` with `status`."""

    def __init__(self, bad: frozenset[bytes] = frozenset(), status: int = 422) -> None:
        self.calls: list[tuple[Hashable, list[bytes]]] = []
        self.bad = bad
        self.status = status
        self.called = asyncio.Event()

    async def flush(self, key: Hashable, rows: Sequence[bytes]) -> None:
        self.calls.append((key, list(rows)))
        self.called.set()
        await asyncio.sleep(0)
        if self.bad & set(rows):
            evidence = HttpEvidence(method="POST", url="http://api/x", status=self.status, body="bad row")
            raise RejectedError("refused", evidence, reason=f"http-{self.status}")


def _batcher(api: FakeApi, *, max_rows: int = 100, max_bytes: int = 10_000, linger_s: float = 0.01) -> Batcher:
    return Batcher(api.flush, max_rows=max_rows, max_bytes=max_bytes, linger_s=linger_s)


async def _submit_all(batcher: Batcher, key: Hashable, rows: list[bytes]) -> list[BaseException | None]:
    return list(await asyncio.gather(*(batcher.submit(key, r) for r in rows), return_exceptions=True))


async def test_rows_submitted_together_share_one_call_in_order() -> None:
    api = FakeApi()
    rows = [f"r{i}".encode() for i in range(10)]
    assert await _submit_all(_batcher(api), "k", rows) == [None] * 10
    assert api.calls == [("k", rows)]


async def test_batches_close_at_max_rows_and_keep_their_order() -> None:
    api = FakeApi()
    rows = [f"r{i}".encode() for i in range(7)]
    await _submit_all(_batcher(api, max_rows=3), "k", rows)
    assert [batch for _key, batch in api.calls] == [rows[0:3], rows[3:6], rows[6:7]]


async def test_a_hung_batch_does_not_hold_the_next_batch_of_its_key() -> None:
    release = asyncio.Event()
    calls: list[list[bytes]] = []

    async def flush(key: Hashable, rows: Sequence[bytes]) -> None:
        calls.append(list(rows))
        if len(calls) == 1:
            await release.wait()  # the first call hangs until the second one was delivered

    batcher = Batcher(flush, max_rows=2, max_bytes=10_000, linger_s=0.01)
    first = [batcher.add("k", b"a"), batcher.add("k", b"b")]
    second = [batcher.add("k", b"c"), batcher.add("k", b"d")]

    await asyncio.wait_for(asyncio.gather(*second), 10)  # a guard: it fails rather than hangs

    assert not any(f.done() for f in first)
    release.set()
    await asyncio.wait_for(asyncio.gather(*first), 10)
    assert calls == [[b"a", b"b"], [b"c", b"d"]]


async def test_batches_never_exceed_max_bytes() -> None:
    api = FakeApi()
    rows = [b"x" * 400 for _ in range(5)]
    await _submit_all(_batcher(api, max_bytes=1000), "k", rows)
    assert [len(batch) for _key, batch in api.calls] == [2, 2, 1]


async def test_different_keys_never_share_a_call() -> None:
    api = FakeApi()
    batcher = _batcher(api)
    await asyncio.gather(batcher.submit("a", b"1"), batcher.submit("b", b"2"), batcher.submit("a", b"3"))
    assert sorted((key, rows) for key, rows in api.calls) == [("a", [b"1", b"3"]), ("b", [b"2"])]


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_a_refused_batch_is_bisected_down_to_the_bad_rows(status: int) -> None:
    rows = [f"r{i}".encode() for i in range(8)]
    api = FakeApi(bad=frozenset({b"r2", b"r5"}), status=status)
    outcomes = await _submit_all(_batcher(api), "k", rows)
    failed = [rows[i] for i, outcome in enumerate(outcomes) if outcome is not None]
    assert failed == [b"r2", b"r5"]
    for outcome in outcomes:
        if outcome is not None:
            assert isinstance(outcome, RejectedError)
            assert outcome.evidence.status == status
    delivered = [row for _key, batch in api.calls for row in batch if not api.bad & set(batch)]
    assert delivered == [r for r in rows if r not in api.bad], "good rows delivered once each, in order"


async def test_refusals_about_the_destination_fail_the_whole_batch_without_splitting() -> None:
    rows = [f"r{i}".encode() for i in range(4)]
    api = FakeApi(bad=frozenset(rows), status=401)
    outcomes = await _submit_all(_batcher(api), "k", rows)
    assert all(isinstance(o, RejectedError) for o in outcomes)
    assert len(api.calls) == 1


async def test_a_lone_row_goes_out_after_the_linger_time() -> None:
    api = FakeApi()
    await asyncio.wait_for(_batcher(api, linger_s=0.001).submit("k", b"only"), timeout=5)
    assert api.calls == [("k", [b"only"])]


async def test_after_aclose_a_waiting_row_is_never_sent() -> None:
    api = FakeApi()
    batcher = _batcher(api, linger_s=0.0)  # its linger timer is due at the loop's next turn
    row = batcher.add("k", b"row")
    await batcher.aclose()
    for _ in range(3):  # the turn the timer was due (its flush would start) and two more (its call would be made)
        await asyncio.sleep(0)

    assert api.calls == []
    assert not row.done(), "left for the partition's next reader"
    row.cancel()


async def test_a_closed_batch_leaves_nothing_kept_for_its_key() -> None:
    """Producers may put per-record values in a config (its metadata is a free map): each is a key of its own, and
    the batcher must not keep one entry per key it ever saw."""
    api = FakeApi()
    batcher = _batcher(api, max_rows=2)
    rows = [batcher.add(("pipe", f"config-{n}"), b"row") for n in range(100)]
    rows += [batcher.add("k", b"a"), batcher.add("k", b"b")]  # closed at max_rows
    await asyncio.wait_for(asyncio.gather(*rows), 10)  # the others closed at the linger time

    assert len(api.calls) == 101
    assert batcher._open == {}


async def test_a_withdrawn_row_leaves_its_open_batch() -> None:
    api = FakeApi()
    batcher = _batcher(api)
    withdrawn, kept = batcher.add("k", b"gone"), batcher.add("k", b"kept")

    withdrawn.cancel()  # its record was cancelled (a stop, a revoke): it is read again
    await asyncio.wait_for(kept, 10)

    assert api.calls == [("k", [b"kept"])]


async def test_a_split_batch_does_not_send_rows_withdrawn_meanwhile() -> None:
    rows = [f"r{i}".encode() for i in range(4)]
    api = FakeApi(bad=frozenset({b"r0"}))
    batcher = _batcher(api)
    outcomes = [batcher.add("k", row) for row in rows]
    await asyncio.wait_for(api.called.wait(), 10)  # the whole batch went out

    outcomes[3].cancel()  # withdrawn while the batch's call was refused and is about to be split
    done = await asyncio.wait_for(asyncio.gather(*outcomes[:3], return_exceptions=True), 10)

    assert [type(o) for o in done] == [RejectedError, type(None), type(None)]
    assert all(b"r3" not in batch for _key, batch in api.calls[1:]), "not sent again once withdrawn"


async def test_a_batch_in_flight_goes_on_for_the_rows_not_withdrawn() -> None:
    release = asyncio.Event()
    called = asyncio.Event()
    calls: list[list[bytes]] = []

    async def flush(key: Hashable, rows: Sequence[bytes]) -> None:
        calls.append(list(rows))
        called.set()
        await release.wait()

    batcher = Batcher(flush, max_rows=2, max_bytes=10_000, linger_s=0.01)
    withdrawn, kept = batcher.add("k", b"a"), batcher.add("k", b"b")
    await asyncio.wait_for(called.wait(), 10)

    withdrawn.cancel()
    release.set()

    await asyncio.wait_for(kept, 10)
    assert calls == [[b"a", b"b"]]


async def test_a_batch_in_flight_whose_rows_are_all_withdrawn_is_cancelled() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def flush(key: Hashable, rows: Sequence[bytes]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # an API that never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    batcher = Batcher(flush, max_rows=2, max_bytes=10_000, linger_s=0.01)
    rows = [batcher.add("k", b"a"), batcher.add("k", b"b")]
    await asyncio.wait_for(started.wait(), 10)

    rows[0].cancel()
    rows[1].cancel()

    await asyncio.wait_for(cancelled.wait(), 10)


async def test_withdrawing_the_rows_a_split_left_waiting_cancels_their_call() -> None:
    """A 400 splits a batch; one half is delivered, the other's call hangs (an outage); a revoke withdraws the two
    rows still waiting: that call must be given up, though half of its batch was settled."""
    hung, cancelled = asyncio.Event(), asyncio.Event()

    async def flush(key: Hashable, rows: Sequence[bytes]) -> None:
        if len(rows) == 4:
            raise RejectedError("bad", HttpEvidence(method="POST", url="http://api/x", status=400))
        if rows[0] == b"a":
            return  # the first half is delivered
        hung.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    batcher = Batcher(flush, max_rows=4, max_bytes=10_000, linger_s=10)
    rows = [batcher.add("k", body) for body in (b"a", b"b", b"c", b"d")]
    await asyncio.wait_for(hung.wait(), 10)
    assert [row.done() for row in rows] == [True, True, False, False]

    rows[2].cancel()
    rows[3].cancel()

    await asyncio.wait_for(cancelled.wait(), 10)
