"""Prefix caching bookkeeping with fake requests and a fake runner that tracks *what* each KV slot holds
(namespace, position, the tokens up to it): a reused block must hold exactly the K/V the request would
have computed itself. Pure Python, milliseconds."""

from __future__ import annotations

import random

import pytest
from test_scheduler import expected_output, sampled

from loraplex.scheduler import prefix_cache
from loraplex.scheduler.block_manager import BlockAllocator
from loraplex.scheduler.request import Request, RequestState
from loraplex.scheduler.sampling_params import SamplingParams
from loraplex.scheduler.scheduler import Batch, Scheduler, StaticResidency

ADAPTERS = ("a", "b", "c")


class Versions:
    """namespace_of for the scheduler: adapter name + a version (a reload bumps it)."""

    def __init__(self) -> None:
        self.version = dict.fromkeys(ADAPTERS, 0)

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return prefix_cache.base_namespace("base")
        return prefix_cache.adapter_namespace(adapter, str(self.version[adapter]))


def make(num_blocks: int = 64, block_size: int = 4, chunk: int | None = None, budget: int = 64, seqs: int = 8):
    versions = Versions()
    res = StaticResidency({a: i for i, a in enumerate(ADAPTERS)})
    sched = Scheduler(seqs, budget, 3, BlockAllocator(num_blocks, block_size), res, chunk, 64, versions)
    return sched, versions


class ContentRunner:
    """A fake model over a simulated paged KV cache whose slots record (namespace, position, prefix):
    every position a step attends to must hold the K/V of this request's own text under its own
    namespace, whoever computed it."""

    def __init__(self, sched: Scheduler, versions: Versions) -> None:
        self.sched, self.versions, self.bs = sched, versions, sched.blocks.block_size
        self.kv: dict[int, tuple[str, int, tuple[int, ...]]] = {}

    def what(self, r: Request, pos: int) -> tuple[str, int, tuple[int, ...]]:
        # the namespace of its admission: a running request pins its adapter, so no reload reaches it
        return (str(r.namespace), pos, tuple(r.all_token_ids[: pos + 1]))

    def run(self, batch: Batch) -> list[int | None]:
        out: list[int | None] = []
        for s in batch.seqs:
            r, n, start = s.request, len(s.token_ids), s.start_pos
            assert s.token_ids == r.all_token_ids[start : start + n]
            for pos in range(start):
                slot = s.block_table[pos // self.bs] * self.bs + pos % self.bs
                assert self.kv.get(slot) == self.what(r, pos), f"{r.request_id} reads foreign K/V at {pos}"
            for i in range(n):
                pos = start + i
                slot = s.block_table[pos // self.bs] * self.bs + pos % self.bs
                self.kv[slot] = self.what(r, pos)
            if s.want_logits:
                out.append(sampled(r.request_id, r.num_tokens))
        return out


def step(sched: Scheduler, runner: ContentRunner) -> Batch:
    batch = sched.schedule()
    sched.postprocess(batch, runner.run(batch))
    sched.check()
    return batch


def drain(sched: Scheduler, runner: ContentRunner) -> None:
    for _ in range(10_000):
        if not sched.has_work():
            return
        step(sched, runner)
    raise AssertionError("scheduler does not terminate")


def req(rid: str, prompt: list[int], adapter: str | None = None, max_tokens: int = 3) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), adapter)


PROMPT = list(range(100, 120))  # 20 tokens: 5 full blocks of 4


def test_repeated_prompt_reuses_blocks_and_keeps_last_token() -> None:
    sched, versions = make()
    runner = ContentRunner(sched, versions)
    first = req("1", PROMPT, "a")
    sched.add(first)
    drain(sched, runner)
    assert first.num_cached_tokens == 0
    second = req("2", PROMPT, "a")
    sched.add(second)
    batch = step(sched, runner)
    # 20 tokens: at most (20 - 1) // 4 = 4 blocks cached; the last block is computed for the logits
    assert second.num_cached_tokens == 16 and [len(s.token_ids) for s in batch.seqs] == [4]
    exact = req("3", PROMPT[:16], "a")  # a prompt of whole blocks still computes its last token
    sched.add(exact)
    step(sched, runner)
    assert exact.num_cached_tokens == 12
    drain(sched, runner)
    assert second.output_token_ids == expected_output(second)
    assert sched.prefix_hits == 28 and sched.prefix_queries == 56


def test_running_sequences_share_blocks_with_reference_counts() -> None:
    sched, versions = make()
    runner = ContentRunner(sched, versions)
    first = req("1", PROMPT, "a", max_tokens=8)
    sched.add(first)
    step(sched, runner)  # prefill done: 5 full blocks published
    second = req("2", [*PROMPT, 7, 7, 7], "a", max_tokens=8)
    sched.add(second)
    step(sched, runner)
    assert second.num_cached_tokens == 20
    assert first.block_table[:5] == second.block_table[:5]
    assert sched.blocks.num_used == len(set(first.block_table) | set(second.block_table))
    drain(sched, runner)
    assert second.output_token_ids == expected_output(second)


def test_multi_turn_chat_reuses_prompt_and_output() -> None:
    sched, versions = make()
    runner = ContentRunner(sched, versions)
    turn1 = req("t1", PROMPT[:10], "b", max_tokens=9)
    sched.add(turn1)
    drain(sched, runner)
    history = turn1.all_token_ids  # 19 tokens: 4 full blocks, the last one partly output
    turn2 = req("t2", [*history, 1, 2, 3], "b")
    sched.add(turn2)
    step(sched, runner)
    assert turn2.num_cached_tokens == 16  # the decode steps published the blocks they filled


def test_isolation_across_adapters_versions_and_base() -> None:
    sched, versions = make()
    runner = ContentRunner(sched, versions)
    for rid, adapter in (("a1", "a"), ("b1", "b"), ("base1", None)):
        r = req(rid, PROMPT, adapter)
        sched.add(r)
        drain(sched, runner)
        assert r.num_cached_tokens == 0, f"{adapter} reused another namespace's blocks"
    versions.version["a"] += 1  # "a" reloaded with other weights
    again = req("a2", PROMPT, "a")
    sched.add(again)
    drain(sched, runner)
    assert again.num_cached_tokens == 0
    same = req("a3", PROMPT, "a")
    sched.add(same)
    drain(sched, runner)
    assert same.num_cached_tokens == 16


def test_isolation_check_catches_a_key_without_namespace(monkeypatch) -> None:
    """Mutation check: with the namespace left out of the key the isolation test must fail."""
    real = prefix_cache.block_key
    monkeypatch.setattr(prefix_cache, "block_key", lambda parent, tokens, ns: real(parent, tokens, "constant"))
    with pytest.raises(AssertionError):
        test_isolation_across_adapters_versions_and_base()


def test_eviction_takes_least_recently_released_blocks_first() -> None:
    sched, versions = make(num_blocks=12)
    runner = ContentRunner(sched, versions)
    old, new = [list(range(1000 + 20 * i, 1020 + 20 * i)) for i in range(2)]
    for rid, prompt in (("old", old), ("new", new)):
        sched.add(req(rid, prompt, "a", max_tokens=1))
        drain(sched, runner)
    assert sched.blocks.num_cached == 10 and sched.blocks.num_evictions == 0
    big = req("big", list(range(5000, 5024)), "a", max_tokens=1)  # 6 blocks: 2 never used + 4 evicted
    sched.add(big)
    drain(sched, runner)
    assert sched.blocks.num_evictions == 4
    hit_new, hit_old = req("n2", new, "a", max_tokens=1), req("o2", old, "a", max_tokens=1)
    sched.add(hit_new)
    sched.add(hit_old)
    drain(sched, runner)
    assert hit_new.num_cached_tokens == 16 and hit_old.num_cached_tokens == 0


def test_aborted_prefill_publishes_only_completed_chunks() -> None:
    sched, versions = make(chunk=4)
    runner = ContentRunner(sched, versions)
    r = req("r", PROMPT, "a")
    sched.add(r)
    step(sched, runner)  # chunk [0, 4) done: one block published
    batch = sched.schedule()  # chunk [4, 8) in flight
    sched.abort("r")
    sched.postprocess(batch, runner.run(batch))
    step(sched, runner)  # reaps
    assert sched.blocks.num_cached == 1 and sched.blocks.num_used == 0
    fresh = req("s", PROMPT, "a")
    sched.add(fresh)
    step(sched, runner)
    assert fresh.num_cached_tokens == 4
    drain(sched, runner)
    # aborted before its first chunk completed: nothing at all
    sched2, versions2 = make(chunk=4)
    runner2 = ContentRunner(sched2, versions2)
    sched2.add(req("x", PROMPT, "a"))
    batch = sched2.schedule()
    sched2.abort("x")
    sched2.postprocess(batch, runner2.run(batch))
    step(sched2, runner2)
    assert sched2.blocks.num_cached == 0 and sched2.blocks.num_free == sched2.blocks.num_blocks


def test_failed_step_publishes_nothing() -> None:
    sched, versions = make()
    sched.add(req("r", PROMPT, "a"))
    batch = sched.schedule()
    sched.fail(batch, "boom")
    sched.check()
    assert sched.blocks.num_cached == 0


def test_allocator_check_catches_a_key_on_two_blocks() -> None:
    blocks = BlockAllocator(4, 2)
    a = blocks.allocate(2)
    assert blocks.publish(a[0], b"k" * 32) and not blocks.publish(a[1], b"k" * 32)
    blocks.check([a])
    blocks._key_of[a[1]] = b"k" * 32  # corrupt: the same key on two blocks
    with pytest.raises(AssertionError, match="two blocks"):
        blocks.check([a])


@pytest.mark.parametrize("seed", range(6))
def test_randomized_sharing_aborts_and_preemption(seed: int) -> None:
    """Random prompts drawn from a few shared prefixes, mixed adapters and the base model, random
    aborts, adapter reloads, a small pool (preemption) and small chunks; invariants every step, every
    read checked against what the request itself would have computed, outputs as if run alone."""
    rng = random.Random(seed)
    sched, versions = make(num_blocks=24, block_size=4, chunk=rng.choice([3, 5, 64]), budget=24, seqs=4)
    runner = ContentRunner(sched, versions)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 30))] for _ in range(4)]
    live: list[Request] = []
    done: list[Request] = []
    for i in range(120):
        if rng.random() < 0.4:
            prompt = [*rng.choice(prefixes), *(rng.randrange(1000) for _ in range(rng.randrange(0, 8)))]
            if rng.random() < 0.3 and done:  # a next chat turn: a finished text plus more
                prev = rng.choice(done)
                prompt = [*prev.all_token_ids, rng.randrange(1000)]
            r = req(f"r{i}", prompt[:60], rng.choice([None, *ADAPTERS]), max_tokens=rng.randrange(1, 8))
            sched.add(r)
            live.append(r)
        if rng.random() < 0.08 and live:
            sched.abort(rng.choice(live).request_id)
        if rng.random() < 0.03:
            versions.version[rng.choice(ADAPTERS)] += 1
        step(sched, runner)
        for r in [r for r in live if r.is_finished]:
            live.remove(r)
            done.append(r)
    drain(sched, runner)
    for r in done + live:
        if r.state is RequestState.FINISHED:
            assert r.output_token_ids == expected_output(r), r.request_id
    assert sched.blocks.num_used == 0 and sched.prefix_hits > 0
