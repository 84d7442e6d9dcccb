"""Property tests: any sequence of add / step / abort keeps the block pool and the budget consistent."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from paged.block_manager import BlockManager
from paged.request import Request, RequestStatus
from paged.sampling_params import SamplingParams
from paged.scheduler import Scheduler

BLOCK = 4


def check_pool(bm: BlockManager, sched: Scheduler) -> None:
    owners = Counter()
    for request in sched.running:
        held = request.block_ids[request.num_released_blocks :]  # the others: behind the sliding window
        assert len(set(held)) == len(held), "a request holds a block twice"
        owners.update(held)
        if bm.window is not None:  # every key a query of the next step may see is still held
            first_seen = max(0, request.num_computed_tokens - bm.window + 1)
            assert request.num_released_blocks <= first_seen // BLOCK
    for request in sched.waiting:
        assert not request.block_ids, "a waiting request holds blocks"
    for block in bm.blocks:
        assert block.ref_count == owners[block.block_id], f"block {block.block_id} ref count is off"
        assert (block.ref_count == 0) == (block.block_id in bm.free_queue), "free queue disagrees with ref counts"
    for block_hash, block_id in bm.cached.items():
        assert bm.blocks[block_id].block_hash == block_hash


def fake_step(sched: Scheduler, budget: int, max_seqs: int) -> None:
    """What the engine does after the model ran: advance counts, append a token, finish at max_tokens."""
    out = sched.schedule()
    assert out.num_batched_tokens <= budget
    assert len(sched.running) <= max_seqs
    for s in out.scheduled:
        request = s.request
        assert s.num_new_tokens > 0
        assert len(request.block_ids) * BLOCK >= request.num_computed_tokens + s.num_new_tokens
        completes = s.completes
        request.num_computed_tokens += s.num_new_tokens
        if completes:
            request.token_ids.append(request.num_tokens % 7)
            if request.num_output_tokens >= request.params.max_tokens:
                sched.finish(request, RequestStatus.FINISHED_LENGTH)


prompts = st.lists(st.integers(0, 2), min_size=1, max_size=20)  # a tiny alphabet makes shared prefixes common
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), prompts, st.integers(1, 12)),
        st.tuples(st.just("step")),
        st.tuples(st.just("abort"), st.integers(0, 50)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(9, 24), budget=st.integers(1, 24), max_seqs=st.integers(1, 6),
       caching=st.booleans(), window=st.one_of(st.none(), st.integers(1, 10)))
def test_any_sequence_keeps_invariants_and_finishes(ops, num_blocks, budget, max_seqs, caching, window):
    bm = BlockManager(num_blocks, BLOCK, caching, window)
    sched = Scheduler(bm, max_seqs, budget)
    requests: list[Request] = []
    for op in ops:
        if op[0] == "add":
            _, prompt, max_tokens = op
            # The engine refuses requests that could never fit in the pool; so does this test.
            if -(-(len(prompt) + max_tokens) // BLOCK) <= num_blocks:
                request = Request(str(len(requests)), prompt, SamplingParams(max_tokens=max_tokens))
                requests.append(request)
                sched.add(request)
        elif op[0] == "step":
            fake_step(sched, budget, max_seqs)
        elif requests:
            request = requests[op[1] % len(requests)]
            if not request.status.finished:
                sched.finish(request, RequestStatus.FINISHED_ABORTED)
        check_pool(bm, sched)
    steps = 0
    while sched.has_unfinished():
        fake_step(sched, budget, max_seqs)
        check_pool(bm, sched)
        steps += 1
        assert steps < 5000, "requests never finish"
    assert all(r.status.finished for r in requests)
    assert bm.num_free_blocks == num_blocks
    for r in requests:
        if r.status is RequestStatus.FINISHED_LENGTH:
            assert r.num_output_tokens == r.params.max_tokens


def test_prefix_is_shared_and_counted():
    bm = BlockManager(16, BLOCK)
    sched = Scheduler(bm, 4, 64)
    first = Request("a", list(range(10)), SamplingParams(max_tokens=1))
    sched.add(first)
    fake_step(sched, 64, 4)
    second = Request("b", list(range(10)) + [3], SamplingParams(max_tokens=1))
    sched.add(second)
    out = sched.schedule()
    assert second.num_cached_tokens == 8 and second.block_ids[:2] == [0, 1]  # the first request's, freed but cached
    assert [s.num_new_tokens for s in out.scheduled if s.request is second] == [3]
    assert bm.prefix_hits == 8


def test_newest_request_is_preempted_first():
    bm = BlockManager(6, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(bm, 4, 100)
    old = Request("old", [1] * 8, SamplingParams(max_tokens=8))
    new = Request("new", [2] * 8, SamplingParams(max_tokens=8))
    sched.add(old)
    sched.add(new)
    fake_step(sched, 100, 4)  # both prefilled: 2 + 2 blocks
    for _ in range(6):  # at 13 tokens each needs 4 blocks: only one fits
        fake_step(sched, 100, 4)
    assert new.num_preemptions >= 1 and old.num_preemptions == 0


def test_a_block_with_a_token_still_in_flight_is_not_cached():
    """A placeholder (-1) for a token not yet read back must not be hashed into the prefix cache."""
    bm = BlockManager(8, BLOCK)
    request = Request("a", [5, 6, 7], SamplingParams(max_tokens=4))
    assert bm.allocate(request, 3)
    request.num_computed_tokens = 3
    request.token_ids.append(-1)  # sampled on the device, not yet on the host
    assert bm.allocate(request, 1) and request.block_hashes == [] and not bm.cached
    request.token_ids[-1] = 8
    request.num_computed_tokens = 4
    request.token_ids.append(9)
    assert bm.allocate(request, 1) and len(request.block_hashes) == 1 and len(bm.cached) == 1


def test_blocks_behind_a_sliding_window_are_released():
    """A sequence far longer than its window holds only the blocks the window spans; the rest go back."""
    bm = BlockManager(8, BLOCK, enable_prefix_caching=False, window=6)
    sched = Scheduler(bm, 1, 4)
    request = Request("long", [1] * 40, SamplingParams(max_tokens=20))  # 60 tokens: 15 blocks without release
    sched.add(request)
    while sched.has_unfinished():
        fake_step(sched, 4, 1)
        check_pool(bm, sched)
        if not request.status.finished:
            assert len(request.block_ids) - request.num_released_blocks <= -(-(6 + 4) // BLOCK) + 1
    assert request.num_output_tokens == 20 and sched.num_preemptions == 0
