"""Scheduler and KV block bookkeeping with fake requests and a fake runner: no model, no torch, ms each."""

from __future__ import annotations

import random
import zlib
from typing import Any

import pytest

from loraplex.scheduler.block_manager import BlockAllocator
from loraplex.scheduler.request import Request, RequestState
from loraplex.scheduler.sampling_params import SamplingParams
from loraplex.scheduler.scheduler import Batch, Residency, Scheduler, StaticResidency


def sampled(request_id: str, position: int) -> int:
    """The fake model's token at `position`: a function of the request and position only, so a
    recomputed (preempted) request produces exactly the text it would produce undisturbed."""
    return zlib.crc32(f"{request_id}:{position}".encode()) % 50_000


def expected_output(r: Request, stop_every: int | None = None) -> list[int]:
    """The output `r` gets alone: max_tokens tokens, or up to a fake EOS (token divisible by stop_every)."""
    out: list[int] = []
    for i in range(r.params.max_tokens):
        out.append(sampled(r.request_id, len(r.prompt_token_ids) + i))
        if stop_every and out[-1] % stop_every == 0:
            break
    return out


def make_request(rid: object, n: int = 4, max_tokens: int = 4, adapter: str | None = None) -> Request:
    return Request(str(rid), [7 + i for i in range(n)], SamplingParams(max_tokens=max_tokens), adapter)


def make_scheduler(
    *,
    num_blocks: int = 256,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 32,
    max_active: int = 4,
    adapters: tuple[str, ...] = ("a", "b", "c", "d"),
    chunk: int | None = None,
    max_wait: int = 64,
    residency: Residency | None = None,
) -> tuple[Scheduler, Any]:
    """A scheduler over a fresh pool, and its residency (StaticResidency unless one is given)."""
    res = residency if residency is not None else StaticResidency({a: i for i, a in enumerate(adapters)})
    blocks = BlockAllocator(num_blocks, block_size)
    return Scheduler(max_num_seqs, budget, max_active, blocks, res, chunk, max_wait), res


class FakeRunner:
    """Stands in for the model runner. It simulates the paged KV cache (cache slot -> (request, position,
    token)) and checks that every step is consistent with it: fed tokens are the request's next tokens,
    block tables cover them, and every earlier position still holds this request's K/V (so blocks were
    neither shared between live sequences nor lost across a preemption)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.block_size = sched.blocks.block_size
        self.kv: dict[int, tuple[str, int, int]] = {}

    def _at(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, batch: Batch) -> list[int | None]:
        out: list[int | None] = []
        for s in batch.seqs:
            r, n, start = s.request, len(s.token_ids), s.start_pos
            assert n >= 1 and r.state in (RequestState.RUNNING, RequestState.ABORTED)  # aborted: in flight
            assert s.token_ids == r.all_token_ids[start : start + n]
            assert len(s.block_table) * self.block_size >= start + n
            assert s.slot == (-1 if r.adapter is None else self.sched.residency.slot_of(r.adapter))
            for pos in range(start):
                assert self.kv.get(self._at(s.block_table, pos)) == (r.request_id, pos, r.all_token_ids[pos])
            for i, token in enumerate(s.token_ids):
                self.kv[self._at(s.block_table, start + i)] = (r.request_id, start + i, token)
            assert s.want_logits == (start + n == r.num_tokens)
            if s.want_logits:
                out.append(sampled(r.request_id, r.num_tokens))
        return out


def step(sched: Scheduler, runner: FakeRunner, finish_check=None) -> tuple[Batch, list[Request]]:
    batch = sched.schedule()
    assert batch.num_tokens <= sched.max_num_batched_tokens
    assert len(batch.seqs) <= sched.max_num_seqs
    assert len({s.request.adapter for s in batch.seqs} - {None}) <= sched.max_active_adapters
    out = sched.postprocess(batch, runner.run(batch), finish_check)
    sched.check()
    return batch, out


def drain(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> list[Batch]:
    batches = []
    while sched.has_work():
        batches.append(step(sched, runner)[0])
        assert len(batches) < max_steps, "scheduler does not terminate"
    return batches


def assert_all_free(sched: Scheduler, res: StaticResidency) -> None:
    assert sched.blocks.num_free == sched.blocks.num_blocks
    sched.blocks.check([])
    assert res.pins == {}
    assert sched.num_running == 0 and sched.num_waiting == 0 and not sched.has_work()


# ---- budgets ---------------------------------------------------------------------------------------
def test_budget_and_max_num_seqs_every_step_and_decodes_never_stall() -> None:
    sched, res = make_scheduler(max_num_seqs=4, budget=16)
    runner = FakeRunner(sched)
    rng = random.Random(1)
    reqs = [
        make_request(i, rng.randint(1, 40), rng.randint(1, 10), rng.choice([None, "a", "b"]))
        for i in range(30)
    ]
    for r in reqs:
        sched.add(r)
    decoding: list[Request] = []  # got a token last step and did not finish: must decode this step
    while sched.has_work():
        batch, out = step(sched, runner)
        assert sched.num_running <= 4
        decodes = {s.request.request_id for s in batch.seqs if len(s.token_ids) == 1}
        assert {r.request_id for r in decoding} <= decodes
        decoding = [r for r in out if not r.is_finished]
    for r in reqs:
        assert (r.state, r.finish_reason) == (RequestState.FINISHED, "length")
        assert r.output_token_ids == expected_output(r)
    assert_all_free(sched, res)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(max_num_seqs=8, budget=4)
    with pytest.raises(ValueError):
        make_scheduler(chunk=0)


# ---- chunked prefill -------------------------------------------------------------------------------
@pytest.mark.parametrize(("chunk", "sizes"), [(None, [15, 15, 15, 5]), (8, [8, 8, 8, 8, 8, 8, 2])])
def test_long_prompt_is_prefilled_in_chunks_while_decodes_continue(
    chunk: int | None, sizes: list[int]
) -> None:
    sched, res = make_scheduler(max_num_seqs=4, budget=16, chunk=chunk)
    runner = FakeRunner(sched)
    short = make_request("short", 3, max_tokens=30)
    sched.add(short)
    step(sched, runner)  # prefill of the short prompt; it decodes from now on
    long = make_request("long", 50, max_tokens=2)
    sched.add(long)
    chunks = []
    while long.num_computed < 50:
        batch, _ = step(sched, runner)
        by_id = {s.request.request_id: s for s in batch.seqs}
        assert len(by_id["short"].token_ids) == 1 and by_id["short"].want_logits  # never stalls
        s = by_id["long"]
        chunks.append(len(s.token_ids))
        assert s.want_logits == (long.num_computed == 50)
        assert long.output_token_ids == ([] if long.num_computed < 50 else long.output_token_ids[:1])
    assert chunks == sizes
    assert len(long.output_token_ids) == 1
    drain(sched, runner)
    assert long.output_token_ids == expected_output(long) and short.output_token_ids == expected_output(short)
    assert_all_free(sched, res)


def test_prompt_longer_than_budget_alone_is_chunked_by_budget() -> None:
    sched, res = make_scheduler(budget=16)
    runner = FakeRunner(sched)
    r = make_request("r", 40, max_tokens=3)
    sched.add(r)
    batches = drain(sched, runner)
    assert [len(b.seqs[0].token_ids) for b in batches] == [16, 16, 8, 1, 1]
    assert [b.seqs[0].want_logits for b in batches] == [False, False, True, True, True]
    assert r.output_token_ids == expected_output(r)
    assert_all_free(sched, res)


# ---- randomized simulation -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1234, 7])
def test_randomized_workload_keeps_block_accounting_exact(seed: int) -> None:
    """240 requests over 5 adapters (one loads late) and the base model, a 20-block pool that forces
    preemptions, random aborts (some while their step is in flight), a fake EOS. The bookkeeping
    invariant holds after every step, and everything is given back at the end."""
    rng = random.Random(seed)
    sched, res = make_scheduler(
        num_blocks=20, block_size=4, max_num_seqs=6, budget=24, max_active=3, chunk=10, max_wait=8
    )
    res.mapping.pop("d")  # "d" becomes resident at step 30
    runner = FakeRunner(sched)
    adapters = [None, "a", "b", "c", "d"]
    pending = [
        make_request(i, rng.randint(1, 30), rng.randint(1, 16), rng.choice(adapters)) for i in range(240)
    ]
    everyone = list(pending)

    def eos(r: Request) -> str | None:
        return "stop" if r.output_token_ids[-1] % 23 == 0 else None

    num_inflight_aborts = 0
    for t in range(5000):
        if t == 30:
            res.mapping["d"] = 3
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            if pending:
                sched.add(pending.pop(0))
        batch = sched.schedule()
        assert batch.num_tokens <= 24 and len(batch.seqs) <= 6
        assert len({s.request.adapter for s in batch.seqs} - {None}) <= 3
        if rng.random() < 0.15:  # abort something, perhaps a sequence of the step in flight
            live = [r for r in everyone if not r.is_finished and r.arrival >= 0]
            if live:
                victim = rng.choice(live)
                num_inflight_aborts += victim.state is RequestState.RUNNING
                assert sched.abort(victim.request_id)
        sched.postprocess(batch, runner.run(batch), eos)
        sched.check()
        assert sum(res.pins.values()) <= sched.num_running
        if not pending and not sched.has_work():
            break
    assert not sched.has_work(), "workload did not finish"
    assert_all_free(sched, res)
    assert sum(r.num_preemptions for r in everyone) > 0 and num_inflight_aborts > 0
    for r in everyone:
        assert r.is_finished
        if r.state is RequestState.ABORTED:
            assert r.finish_reason == "abort"
            continue
        assert r.finish_reason in ("stop", "length")
        assert r.output_token_ids == expected_output(r, stop_every=23)


# ---- preemption ------------------------------------------------------------------------------------
def test_preemption_takes_the_newest_and_it_completes_with_the_same_tokens() -> None:
    # 6 blocks of 2 tokens: two requests of 4 prompt tokens and 6 outputs cannot both finish.
    sched, res = make_scheduler(num_blocks=6, block_size=2, max_num_seqs=4, budget=16)
    runner = FakeRunner(sched)
    old, new, later = make_request("old", 4, 6), make_request("new", 4, 6), make_request("later", 4, 2)
    sched.add(old)
    sched.add(new)
    batches = [step(sched, runner)[0]]
    sched.add(later)  # waits: no blocks
    while not batches[-1].preempted:
        batches.append(step(sched, runner)[0])
    hit = batches[-1]
    assert hit.preempted == [new] and [s.request for s in hit.seqs] == [old]
    assert new.state is RequestState.PREEMPTED and new.num_computed == 0 and not new.block_table
    assert new.num_preemptions == 1 and len(new.output_token_ids) > 0
    batches += drain(sched, runner)
    # the preempted request went back to the front: readmitted before `later`, which arrived before
    # its preemption
    assert new.admitted_step is not None and later.admitted_step is not None
    assert new.admitted_step <= later.admitted_step
    readmit = next(b for b in batches if b.step == new.admitted_step)
    order = [s.request for s in readmit.seqs]
    assert later not in order or order.index(new) < order.index(later)
    for r in (old, new, later):
        assert r.finish_reason == "length" and r.output_token_ids == expected_output(r)
    assert_all_free(sched, res)


# ---- adapters --------------------------------------------------------------------------------------
def test_non_resident_adapter_waits_while_others_run_then_is_admitted() -> None:
    sched, res = make_scheduler(adapters=("a",))
    runner = FakeRunner(sched)
    rb = make_request("b0", 4, 3, "b")
    sched.add(rb)
    ras = [make_request(f"a{i}", 4, 3, "a") for i in range(4)]
    for r in ras:
        sched.add(r)
    for _ in range(5):
        batch, _ = step(sched, runner)
        assert rb not in [s.request for s in batch.seqs]
    assert all(r.finish_reason == "length" for r in ras)
    assert rb.state is RequestState.WAITING and res.load_requests == ["b"]
    res.mapping["b"] = 1  # the load finished
    batch, _ = step(sched, runner)
    assert [(s.request, s.slot) for s in batch.seqs] == [(rb, 1)]
    drain(sched, runner)
    assert res.load_requests == ["b"]
    assert rb.output_token_ids == expected_output(rb)
    assert_all_free(sched, res)


def test_at_most_max_active_adapters_per_step() -> None:
    sched, res = make_scheduler(max_active=2, max_num_seqs=8, budget=32)
    runner = FakeRunner(sched)
    rng = random.Random(7)
    reqs = [make_request(i, rng.randint(1, 12), rng.randint(1, 6), rng.choice("abcd")) for i in range(40)]
    for r in reqs:
        sched.add(r)
    seen = set()
    for batch in drain(sched, runner):
        used = {s.request.adapter for s in batch.seqs}
        assert len(used) <= 2
        seen |= used
    assert seen == set("abcd")
    assert all(r.output_token_ids == expected_output(r) for r in reqs)
    assert_all_free(sched, res)


def test_base_model_requests_do_not_count_as_adapters() -> None:
    sched, res = make_scheduler(max_active=1)
    runner = FakeRunner(sched)
    for r in (make_request("x", adapter="a"), make_request("y"), make_request("z")):
        sched.add(r)
    batch, _ = step(sched, runner)
    assert {s.request.request_id for s in batch.seqs} == {"x", "y", "z"}
    assert {s.slot for s in batch.seqs} == {0, -1}
    drain(sched, runner)
    assert_all_free(sched, res)


# ---- fairness --------------------------------------------------------------------------------------
def run_hot_workload(max_wait: int, steps: int) -> tuple[Request, Scheduler, StaticResidency, FakeRunner]:
    """Two new requests for hot adapter "a" every step (max_tokens 1..8), one request for "b" at step 5,
    one adapter per step: without the fairness rule "a" never drains and "b" never runs."""
    sched, res = make_scheduler(max_active=1, max_num_seqs=64, budget=64, num_blocks=2000, max_wait=max_wait)
    runner = FakeRunner(sched)
    rng = random.Random(3)
    b = make_request("b", 4, 4, "b")
    for t in range(steps):
        for i in range(2):
            sched.add(make_request(f"a{t}.{i}", 4, rng.randint(1, 8), "a"))
        if t == 5:
            sched.add(b)
        step(sched, runner)
    return b, sched, res, runner


def test_fairness_bound_under_a_hot_adapter() -> None:
    max_wait, max_tokens = 10, 8
    b, sched, res, runner = run_hot_workload(max_wait, steps=60)
    # k = 0 (every "a" request is admitted on arrival) and D = 0 (resident), S = max_tokens:
    # the docstring bound is waiting_since + max_wait + max_tokens.
    assert b.admitted_step is not None
    waited = b.admitted_step - b.waiting_since
    assert max_wait <= waited <= max_wait + max_tokens
    drain(sched, runner)
    assert b.output_token_ids == expected_output(b)
    assert_all_free(sched, res)


def test_without_the_fairness_rule_the_hot_adapter_starves_the_other() -> None:
    b, _, _, _ = run_hot_workload(max_wait=10_000, steps=200)
    assert b.admitted_step is None


class SlowCache:
    """A tiny adapter cache for the fairness bound with D > 0: `num_slots` slots, a load takes
    `load_steps` ticks during which some slot is free or unpinned, LRU eviction of unpinned slots."""

    def __init__(self, resident: dict[str, int], num_slots: int, load_steps: int) -> None:
        self.slots: dict[str, int] = dict(resident)
        self.num_slots, self.load_steps = num_slots, load_steps
        self.pins: dict[str, int] = {}
        self.last_use: dict[str, int] = dict.fromkeys(resident, 0)
        self.loading: dict[str, int] = {}  # adapter -> ticks of progress
        self.load_requests: list[str] = []
        self.clock = 0

    def slot_of(self, adapter: str) -> int | None:
        return self.slots.get(adapter)

    def request_load(self, adapter: str) -> None:
        self.load_requests.append(adapter)
        if adapter not in self.slots:
            self.loading.setdefault(adapter, 0)

    def pin(self, adapter: str) -> None:
        self.pins[adapter] = self.pins.get(adapter, 0) + 1
        self.last_use[adapter] = self.clock

    def unpin(self, adapter: str) -> None:
        self.pins[adapter] -= 1
        if not self.pins[adapter]:
            del self.pins[adapter]

    def tick(self) -> None:
        self.clock += 1
        for adapter in list(self.loading):
            free = set(range(self.num_slots)) - set(self.slots.values())
            unpinned = [a for a in self.slots if a not in self.pins]
            if not free and not unpinned:
                continue
            self.loading[adapter] += 1
            if self.loading[adapter] >= self.load_steps:
                if free:
                    slot = min(free)
                else:
                    evict = min(unpinned, key=lambda a: self.last_use[a])
                    slot = self.slots.pop(evict)
                self.slots[adapter] = slot
                del self.loading[adapter]


def hot_two_adapter_run(seed: int, arrivals: list[int], max_wait: int, max_tokens: int, load_steps: int):
    """Hot adapters "a" and "c" fill both device slots and both active-adapter places; "b" (arriving at
    step 8) needs a slot to be unpinned, then a `load_steps` load. max_num_seqs 4 lets older requests
    queue too (k > 0). Returns (b's admission step, its waiting_since, k)."""
    cache = SlowCache({"a": 0, "c": 1}, num_slots=2, load_steps=load_steps)
    sched, _ = make_scheduler(
        max_active=2, max_num_seqs=4, budget=64, num_blocks=4000, max_wait=max_wait, residency=cache
    )
    runner = FakeRunner(sched)
    rng = random.Random(seed)
    everyone: list[Request] = []
    b = make_request("b", 4, 4, "b")
    for t in range(300):
        for i in range(rng.choice(arrivals)):
            everyone.append(make_request(f"h{t}.{i}", 4, rng.randint(1, max_tokens), rng.choice("ac")))
            sched.add(everyone[-1])
        if t == 8:
            everyone.append(b)
            sched.add(b)
        step(sched, runner)
        cache.tick()
        if b.is_finished:
            break
    assert b.admitted_step is not None and "b" in cache.load_requests
    assert all(r.num_preemptions == 0 for r in everyone)  # so S = max_tokens holds
    starved_at = b.waiting_since + max_wait
    older_still_waiting = [
        r
        for r in everyone
        if r.arrival < b.arrival and (r.admitted_step is None or r.admitted_step >= starved_at)
    ]
    return b.admitted_step, b.waiting_since, len(older_still_waiting)


def test_fairness_bound_with_older_waiters_and_a_slow_adapter_load() -> None:
    max_wait, max_tokens, load_steps = 6, 6, 3
    runs = [
        hot_two_adapter_run(seed, arrivals, max_wait, max_tokens, load_steps)
        for seed in range(4)
        for arrivals in ([0, 1, 1, 2], [1, 2], [2])  # up to overload: the queue keeps growing
    ]
    for admitted, w, k in runs:
        # the docstring bound with S = max_tokens (one-chunk prompts, no preemption), D = load_steps
        assert admitted <= w + max_wait + (k + 1) * (max_tokens + load_steps), (admitted, w, k)
    assert any(k > 0 for _, _, k in runs)  # older waiters were served first
    assert any(admitted - w > max_wait for admitted, w, _ in runs)  # the starvation rule was needed


# ---- abort / fail / never fits ---------------------------------------------------------------------
def test_abort_waiting_and_running_requests() -> None:
    sched, res = make_scheduler(max_num_seqs=1, budget=8)
    runner = FakeRunner(sched)
    running, waiting = make_request("run", 4, 10, "a"), make_request("wait", 4, 10, "b")
    sched.add(running)
    sched.add(waiting)
    step(sched, runner)
    assert sched.abort("wait") and waiting.state is RequestState.ABORTED and sched.num_waiting == 0
    batch = sched.schedule()
    assert batch.aborted == [waiting] and [s.request for s in batch.seqs] == [running]
    used = sched.blocks.num_used
    assert sched.abort("run")  # while its step is in flight: blocks stay until the next schedule()
    assert not sched.abort("run") and not sched.abort("nobody")
    assert sched.blocks.num_used == used and res.pins == {"a": 1}
    num_out = len(running.output_token_ids)
    assert sched.postprocess(batch, runner.run(batch)) == []
    assert len(running.output_token_ids) == num_out and sched.blocks.num_used == used
    assert sched.has_work()
    batch = sched.schedule()
    assert batch.aborted == [running] and not batch.seqs
    assert running.finish_reason == "abort" and waiting.finish_reason == "abort"
    assert_all_free(sched, res)


def test_fail_frees_everything_and_later_requests_succeed() -> None:
    sched, res = make_scheduler(block_size=2)
    runner = FakeRunner(sched)
    reqs = [make_request(i, 3 + i, 5, adapter) for i, adapter in enumerate([None, "a", "b"])]
    for r in reqs:
        sched.add(r)
    step(sched, runner)
    batch = sched.schedule()
    assert sched.fail(batch, "step raised: boom") == reqs
    assert all(
        (r.state, r.finish_reason, r.error) == (RequestState.FINISHED, "error", "step raised: boom")
        for r in reqs
    )
    assert_all_free(sched, res)
    later = make_request("later", 5, 3, "a")
    sched.add(later)
    drain(sched, runner)
    assert later.output_token_ids == expected_output(later)
    assert_all_free(sched, res)


def test_fail_after_postprocess_raised_midway() -> None:
    """The engine's finish_check may raise inside postprocess: fail() then ends whatever is still running."""
    sched, res = make_scheduler()
    runner = FakeRunner(sched)
    first, second = make_request("first", 3, 1), make_request("second", 3, 5)
    sched.add(first)
    sched.add(second)
    batch = sched.schedule()

    def check(r: Request) -> str | None:
        if r is second:
            raise RuntimeError("detokenizer broke")
        return None

    with pytest.raises(RuntimeError, match="detokenizer"):
        sched.postprocess(batch, runner.run(batch), check)
    assert first.finish_reason == "length"  # finished before the error
    assert sched.fail(batch, "detokenizer broke") == [second] and second.finish_reason == "error"
    assert_all_free(sched, res)


def test_prompt_that_can_never_fit_is_failed_with_a_clear_message() -> None:
    sched, res = make_scheduler(num_blocks=4, block_size=4)
    runner = FakeRunner(sched)
    big, ok = make_request("big", 17, 2), make_request("ok", 3, 2)
    sched.add(big)
    sched.add(ok)
    batches = drain(sched, runner)  # failed at its turn for admission; `ok`, queued behind it, passes
    assert big.finish_reason == "error" and big.state is RequestState.FINISHED
    assert (
        big.error == "prompt of 17 tokens can never fit: the KV cache holds 4 blocks of 4 tokens (16 tokens)"
    )
    assert batches[0].failed == [big] and len(batches) == 2
    assert ok.output_token_ids == expected_output(ok)
    assert_all_free(sched, res)


def test_sequence_that_outgrows_the_whole_pool_is_failed() -> None:
    sched, res = make_scheduler(num_blocks=4, block_size=4)
    runner = FakeRunner(sched)
    r = make_request("grow", 14, 10)
    sched.add(r)
    batches = drain(sched, runner, max_steps=50)
    assert (
        r.finish_reason == "error"
        and r.error is not None
        and r.error.startswith("sequence of 17 tokens can never fit")
    )
    assert len(r.output_token_ids) == 3  # tokens 15 and 16 were fed; the 17th needs a 5th block
    assert any(r in b.failed for b in batches)
    assert_all_free(sched, res)


# ---- postprocess contract --------------------------------------------------------------------------
def test_finish_check_and_missing_token() -> None:
    sched, res = make_scheduler()
    r = make_request("r", 4, 10)
    sched.add(r)
    batch = sched.schedule()
    assert sched.postprocess(batch, [None]) == []  # no token this time: the last prompt token is fed again
    assert r.num_computed == 3 and not r.output_token_ids
    batch = sched.schedule()
    assert (batch.seqs[0].start_pos, batch.seqs[0].token_ids) == (3, [10])
    assert sched.postprocess(batch, [42]) == [r] and r.output_token_ids == [42]
    batch = sched.schedule()
    out = sched.postprocess(batch, [99], lambda q: "stop" if q.output_token_ids[-1] == 99 else None)
    assert out == [r] and (r.finish_reason, r.output_token_ids) == ("stop", [42, 99])
    assert_all_free(sched, res)


def test_step_contract_is_enforced() -> None:
    sched, _ = make_scheduler()
    sched.add(make_request("r"))
    batch = sched.schedule()
    with pytest.raises(RuntimeError, match="before postprocess"):
        sched.schedule()
    with pytest.raises(ValueError, match="token ids"):
        sched.postprocess(batch, [])
    sched.postprocess(batch, [1])
    with pytest.raises(RuntimeError, match="not the one in flight"):
        sched.postprocess(batch, [1])
    with pytest.raises(ValueError, match="already queued"):
        sched.add(make_request("r"))
    r = sched.postprocess(sched.schedule(), [2])[0]
    assert r.output_token_ids == [1, 2]


# ---- block allocator -------------------------------------------------------------------------------
def test_block_allocator_check_catches_double_free_and_leaks() -> None:
    blocks = BlockAllocator(8, 4)
    a, b = blocks.allocate(3), blocks.allocate(2)
    assert a == [0, 1, 2] and blocks.num_used == 5
    blocks.check([a, b])
    with pytest.raises(AssertionError, match="leaked"):
        blocks.check([a])
    with pytest.raises(AssertionError, match="twice"):
        blocks.check([a, b, [a[0]]])
    stale = list(a)
    blocks.free(a)
    assert a == [] and blocks.num_free == 6
    with pytest.raises(ValueError, match="double free"):
        blocks.free(stale)
    blocks.free(b)
    blocks.check([])
    assert blocks.allocate(2) == [3, 4]  # the most recently freed first (LIFO), as before
