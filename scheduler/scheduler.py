"""Continuous batching across adapters (pure Python): which tokens of which requests go into each step.

The step contract, driven by the engine's loop thread:

    batch = scheduler.schedule()             # admit, chunk, grow block tables, maybe preempt
    token_ids = run(batch.seqs)              # one forward pass; one sampled token per want_logits seq
    scheduler.postprocess(batch, token_ids)  # append tokens, finish, free blocks
    # or, when the step raised: scheduler.fail(batch, message)

Prefix caching (with `namespace_of`): admission looks up the request's full blocks by content address
(scheduler/prefix_cache.py), shares the cached ones (reference counts, block_manager.py) and feeds only
the rest; postprocess publishes the blocks a completed step filled. Aborted or failed steps publish
nothing, and the last token is always computed (its logits are needed).

Fairness bound (what `max_wait_steps` buys). A step is one schedule() call. A waiting request is
*starved* once it has been passed over for `max_wait_steps` steps since it entered the queue
(`step - waiting_since >= max_wait_steps`; arrival or preemption). Starved requests are tried before
all others, oldest `waiting_since` first (ties in queue order), and the first one that cannot be
admitted stops all admission in that step: running sequences keep stepping, nothing new joins them.

Guarantee: let X enter the waiting queue at step w, and let k be the number of requests that entered
it earlier (or in the same step, ahead of X) and are still waiting at step w + max_wait_steps.
Assume (S) every request leaves the running set (finishes, is aborted or preempted) within S steps of
its admission, (D) a non-resident adapter becomes resident within D steps once no running sequence
pins a slot (StaticResidency: D = 0), and (P) X's tokens fit the whole KV pool (else it is failed).
Then X is admitted by step w + max_wait_steps + (k + 1) * (S + D). For prompts admitted in one chunk
S is the largest max_tokens; so under a hot-adapter workload with resident adapters (k = 0, D = 0) a
request is admitted within max_wait_steps + max_tokens steps. Why: from the step at which X is the
oldest starved request, nothing but X joins the running set, which empties within S steps; then the
budget, max_num_seqs, max_active_adapters and the block pool all have room for X, and after D more
steps so does residency. Each of the k older starved requests costs at most S + D steps the same way.

Background requests (`priority` > 0: shadow runs) sit outside that bound and never weaken it: they are
never counted as starved, are admitted only after every normal waiting request was admitted (none left
waiting), hold at most half of max_num_seqs, and come last in the running order, so preemption takes
them first. They never share a step with a normal request: a step that holds any normal sequence leaves
the background ones out (paused, keeping their KV blocks), because on CPU every extra adapter in a step
slows every sequence in it. Their prefill chunks are at most BACKGROUND_CHUNK tokens, so a real request
that arrives during a background step waits one short step at most. They may wait indefinitely under
sustained load, which is what spare-capacity work means.
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .block_manager import BlockAllocator
from .prefix_cache import extend_keys
from .request import Request, RequestState

FinishCheck = Callable[[Request], str | None]


# Tokens of a background prompt computed per step: a step of spare-capacity work stays short.
BACKGROUND_CHUNK = 64


def _priority(r: Request) -> int:
    return r.priority


def _run_order(r: Request) -> tuple[int, int]:
    return (r.priority, r.arrival)


class Residency(Protocol):
    """What the scheduler asks of the adapter cache. Do not call Scheduler methods while holding a lock
    that these methods take (the scheduler calls them under its own lock)."""

    def slot_of(self, adapter: str) -> int | None:
        """Device slot of `adapter` if resident, else None."""
        ...

    def request_load(self, adapter: str) -> None:
        """Start loading `adapter` in the background (idempotent)."""
        ...

    def pin(self, adapter: str) -> None:
        """One more running sequence uses `adapter`: never evict its slot while pinned."""
        ...

    def unpin(self, adapter: str) -> None: ...


class StaticResidency:
    """Every configured adapter is resident in a fixed slot (the engine's choice until the adapter cache
    lands). Counts pins and records load requests, so tests can check both; tests make an adapter
    resident later by adding it to `mapping`."""

    def __init__(self, mapping: dict[str, int]) -> None:
        self.mapping = dict(mapping)
        self.pins: dict[str, int] = {}
        self.load_requests: list[str] = []

    def slot_of(self, adapter: str) -> int | None:
        return self.mapping.get(adapter)

    def request_load(self, adapter: str) -> None:
        self.load_requests.append(adapter)

    def pin(self, adapter: str) -> None:
        if adapter not in self.mapping:
            raise ValueError(f"adapter {adapter!r} is not resident")
        self.pins[adapter] = self.pins.get(adapter, 0) + 1

    def unpin(self, adapter: str) -> None:
        if self.pins.get(adapter, 0) < 1:
            raise ValueError(f"adapter {adapter!r} is not pinned")
        self.pins[adapter] -= 1
        if not self.pins[adapter]:
            del self.pins[adapter]


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's part of a step. Field names match engine.runner.StepSeq, so the runner can take it."""

    request: Request
    token_ids: list[int]  # the new tokens fed this step: all_token_ids[start_pos : start_pos + n]
    start_pos: int  # position of token_ids[0]
    block_table: list[int]  # a copy: KV blocks for positions [0, start_pos + n) (and perhaps a bit more)
    slot: int  # adapter device slot, -1 = base model
    want_logits: bool  # the last token fed ends the known text: sample the next one


@dataclass
class Batch:
    """One step: `seqs` in the order the runner sees them (decodes, then prefill chunks of running
    requests, then newly admitted ones), plus what changed state in this schedule() call."""

    step: int
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)  # back in the queue; no action needed
    aborted: list[Request] = field(default_factory=list)  # aborts that took effect since the last call
    failed: list[Request] = field(default_factory=list)  # finished with "error" outside a step

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def num_logits(self) -> int:
        return sum(s.want_logits for s in self.seqs)


class _Verdict(enum.Enum):
    ADMITTED = 1
    SKIP = 2  # this request's adapter cannot join now: later requests may pass it
    STOP = 3  # a shared resource (budget, sequences, blocks) is exhausted: nobody behind may pass


@dataclass
class _Room:
    """What is left for admissions in the step being built."""

    budget: int  # tokens
    reserve: int  # blocks kept for next step's decodes that will cross a block boundary
    active: set[str]  # adapters of the running set (base excluded)


class Scheduler:
    """Waiting queue + running set over a paged KV pool; see the module docstring for the step contract
    and the fairness bound. Thread-safe: add/abort may come from other threads (one lock; the
    finish_check callback runs under it and may call back into the scheduler)."""

    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_active_adapters: int,
        blocks: BlockAllocator,
        residency: Residency,
        prefill_chunk_size: int | None = None,
        max_wait_steps: int = 64,
        namespace_of: Callable[[str | None], str] | None = None,
    ) -> None:
        """`namespace_of(adapter)` turns on prefix caching: the namespace of the K/V that `adapter` (None:
        the base model) computes, asked at admission once the adapter is resident (scheduler/prefix_cache.py)."""
        if min(max_num_seqs, max_num_batched_tokens, max_active_adapters) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_active_adapters must be >= 1")
        if max_num_batched_tokens < max_num_seqs:
            # Every running sequence decodes in every step only if the budget holds one token each.
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs ({max_num_seqs})"
            )
        if prefill_chunk_size is not None and prefill_chunk_size < 1:
            raise ValueError("prefill_chunk_size must be >= 1 or None")
        if max_wait_steps < 0:
            raise ValueError("max_wait_steps must be >= 0 (0 = strict first-come first-served)")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_active_adapters = max_active_adapters
        self.blocks = blocks
        self.residency = residency
        self.prefill_chunk_size = prefill_chunk_size or max_num_batched_tokens
        self.max_wait_steps = max_wait_steps
        self.namespace_of = namespace_of
        self.prefix_queries = 0  # tokens looked up in the prefix cache at admission
        self.prefix_hits = 0  # of those, tokens found cached (not computed again)
        self._waiting: deque[Request] = deque()  # preempted at the front, then arrival order
        # normal priority first, then oldest arrival first: preemption takes the last
        self._running: list[Request] = []
        self._live: dict[str, Request] = {}  # waiting + running, by id
        self._aborted: list[Request] = []  # aborted since the last schedule(); running ones hold blocks
        self._failed: list[Request] = []  # failed outside a step since the last schedule()
        self._load_asked: dict[str, int] = {}  # adapter -> step of its last request_load
        self._inflight: Batch | None = None
        self._step = 0
        self._num_added = 0
        self._lock = threading.RLock()

    # ---- queue ------------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def step(self) -> int:
        """Number of schedule() calls so far (the id of the next step)."""
        return self._step

    def has_work(self) -> bool:
        """Whether schedule() has anything to do: requests to step or state changes to report."""
        with self._lock:
            return bool(self._waiting or self._running or self._aborted or self._failed)

    def add(self, request: Request) -> None:
        """Queue a new request. Whether it can ever run is the caller's up-front check (the engine's
        EngineInfo.check_request); one that still cannot fit the KV pool is failed when its turn comes
        (finish_reason "error", `error` says why) rather than left waiting forever."""
        with self._lock:
            if request.state is not RequestState.WAITING or request.output_token_ids or request.num_computed:
                raise ValueError(f"request {request.request_id!r} is not a fresh waiting request")
            if not request.prompt_token_ids:
                raise ValueError(f"request {request.request_id!r} has an empty prompt")
            if request.request_id in self._live:
                raise ValueError(f"request id {request.request_id!r} is already queued or running")
            request.arrival = self._num_added
            request.waiting_since = self._step
            self._num_added += 1
            self._live[request.request_id] = request
            self._waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Cancel a request. A waiting one leaves the queue now; a running one is marked ABORTED and keeps
        its blocks until the next schedule(), because a step in flight may still be using them. Both are
        reported in the next batch's `aborted`. False when the id is unknown or already finished."""
        with self._lock:
            r = self._live.pop(request_id, None)
            if r is None:
                return False
            if r.state is not RequestState.RUNNING:
                self._waiting.remove(r)
            r.state, r.finish_reason = RequestState.ABORTED, "abort"
            self._aborted.append(r)
            return True

    def fail_adapter(self, adapter: str, message: str) -> list[Request]:
        """Fail every waiting request for `adapter` (the engine calls this when its load failed, which
        would otherwise leave them waiting forever). Returns them, and reports them in the next
        schedule()'s batch.failed so their streams end; running ones are untouched."""
        with self._lock:
            hit = [r for r in self._waiting if r.adapter == adapter]
            for r in hit:
                self._finish(r, "error", message)
            self._failed.extend(hit)
            self._load_asked.pop(adapter, None)
            return hit

    # ---- the step contract ------------------------------------------------------------------------
    def schedule(self) -> Batch:
        """Build the next step: every running decode (one token each), prefill chunks of running
        requests, then admissions, all under the token budget. May preempt (newest first) when the pool
        cannot hold the next token of a running sequence. An empty `seqs` means nothing can run now
        (e.g. every waiting adapter is loading): skip the forward pass and wait a little."""
        with self._lock:
            if self._inflight is not None:
                raise RuntimeError("schedule() called before postprocess() or fail() of the previous batch")
            batch = Batch(self._step)
            self._reap(batch)
            budget = self._schedule_running(batch)
            if not batch.preempted:  # memory is short right now: admitting would only thrash
                self._admit(batch, budget)
            if any(q.request.priority == 0 for q in batch.seqs):  # background work pauses (keeps its KV)
                batch.seqs = [q for q in batch.seqs if q.request.priority == 0]
            self._step += 1
            if batch.seqs:
                self._inflight = batch
            return batch

    def postprocess(
        self, batch: Batch, token_ids: Sequence[int | None], finish_check: FinishCheck | None = None
    ) -> list[Request]:
        """Account for a finished step. `token_ids` has one entry per want_logits seq, in order; None
        means no token this time (the last token is fed again next step). Each token is appended, then
        `finish_check(request)` (EOS, stop strings...; it may drop the last token since the request
        ends) decides; max_tokens is always enforced ("length"). Finished requests free their blocks
        and unpin their adapter now. Requests aborted while the step ran are skipped. Returns the
        requests that received a token or finished, in batch order (for streaming)."""
        with self._lock:
            if not batch.seqs:
                return []
            if batch is not self._inflight:
                raise RuntimeError(f"batch of step {batch.step} is not the one in flight")
            if len(token_ids) != batch.num_logits:
                raise ValueError(
                    f"{len(token_ids)} token ids for {batch.num_logits} sequences that want logits"
                )
            out: list[Request] = []
            it = iter(token_ids)
            for s in batch.seqs:
                r = s.request
                token = next(it) if s.want_logits else None
                if r.state is not RequestState.RUNNING:
                    continue  # aborted (or failed) while the step ran
                if r.num_computed != s.start_pos:
                    raise RuntimeError(f"request {r.request_id!r} moved since step {batch.step} was built")
                fed = len(s.token_ids)
                if s.want_logits and token is None:
                    r.num_computed += fed - 1
                    self._publish(r)
                    continue
                r.num_computed += fed
                self._publish(r)  # before the new token lands: a finish check may drop it again
                if token is None:
                    continue  # a prefill chunk that does not end the known text
                r.output_token_ids.append(token)
                reason = finish_check(r) if finish_check is not None else None
                if reason is None and len(r.output_token_ids) >= r.params.max_tokens:
                    reason = "length"
                if reason is not None:
                    self._finish(r, reason)
                out.append(r)
            self._inflight = None
            return out

    def fail(self, batch: Batch, message: str) -> list[Request]:
        """The step of `batch` raised: finish each of its still-running requests with "error" and
        `message`, freeing their blocks. Returns them. The scheduler goes on with the next schedule()."""
        with self._lock:
            out = []
            for s in batch.seqs:
                r = s.request
                if r.state is RequestState.RUNNING:
                    self._finish(r, "error", message)
                    out.append(r)
            if batch is self._inflight:
                self._inflight = None
            return out

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix: the engine released its KV cache (idle offload, so nothing runs)."""
        with self._lock:
            if self._running:
                raise RuntimeError("cannot drop the prefix cache while requests run")
            self.blocks.clear_cached()

    def check(self) -> None:
        """Raise AssertionError when the bookkeeping is inconsistent (tests call it after every step)."""
        with self._lock:
            self.blocks.check(r.block_table for r in self._running)
            if len(self._running) > self.max_num_seqs:
                raise AssertionError(f"{len(self._running)} running > max_num_seqs {self.max_num_seqs}")
            active = {r.adapter for r in self._running if r.adapter is not None}
            if len(active) > self.max_active_adapters:
                raise AssertionError(f"{len(active)} active adapters > {self.max_active_adapters}")
            for r in self._running:
                held = len(r.block_table) * self.blocks.block_size
                if r.state not in (RequestState.RUNNING, RequestState.ABORTED) or held < r.num_computed:
                    raise AssertionError(f"running request {r.request_id!r} is inconsistent")
                if not 0 <= r.num_computed < r.num_tokens:
                    raise AssertionError(f"request {r.request_id!r}: num_computed {r.num_computed}")
            for r in self._waiting:
                if (
                    r.state not in (RequestState.WAITING, RequestState.PREEMPTED)
                    or r.block_table
                    or r.num_computed
                ):
                    raise AssertionError(f"waiting request {r.request_id!r} holds state")
            if len(self._live) + sum(r.state is RequestState.ABORTED for r in self._running) != len(
                self._waiting
            ) + len(self._running):
                raise AssertionError("request index out of sync with the queues")

    # ---- internals --------------------------------------------------------------------------------
    def _fail_if_never_fits(self, r: Request, batch: Batch) -> bool:
        """The scheduler's one pool guard, at admission and at growth: a sequence needing more blocks
        than the whole pool could never run, so it is failed (reported in batch.failed) instead of
        waiting forever. Requests the engine's up-front check accepted never get here."""
        b = self.blocks
        if b.blocks_needed(r.num_tokens, 0) <= b.num_blocks:
            return False
        what = "sequence" if r.output_token_ids else "prompt"
        pool = f"the KV cache holds {b.num_blocks} blocks of {b.block_size} tokens ({b.num_blocks * b.block_size} tokens)"
        self._finish(r, "error", f"{what} of {r.num_tokens} tokens can never fit: {pool}")
        batch.failed.append(r)
        return True

    def _reap(self, batch: Batch) -> None:
        """Free the blocks of requests aborted since the last step (no step is in flight now)."""
        for r in self._aborted:
            if r in self._running:
                self._release(r)
        batch.aborted, self._aborted = self._aborted, []
        batch.failed, self._failed = self._failed, []

    def _schedule_running(self, batch: Batch) -> int:
        """Decodes first (one token each; the budget always holds them), then prefill chunks of running
        requests, oldest first. Returns the token budget left."""
        budget = self.max_num_batched_tokens
        for r in [r for r in self._running if r.num_tokens - r.num_computed == 1]:
            if r.state is RequestState.RUNNING and self._grow(r, batch):
                batch.seqs.append(self._seq(r, 1))
                budget -= 1
        for r in [r for r in self._running if r.num_tokens - r.num_computed > 1]:
            n = min(r.num_tokens - r.num_computed, budget, self._chunk(r))
            if n > 0:
                batch.seqs.append(self._seq(r, n))
                budget -= n
        return budget

    def _grow(self, r: Request, batch: Batch) -> bool:
        """Give decoding `r` the blocks for its next token, preempting the newest running sequences if
        the pool is short. False when `r` itself was preempted or failed (it is not in this step)."""
        if self._fail_if_never_fits(r, batch):
            return False
        need = self.blocks.blocks_needed(r.num_tokens, len(r.block_table))
        while not self.blocks.can_allocate(need):
            # The last in run order (background first, then newest); never one already in this step:
            # decodes are scheduled in run order, so those come before r.
            victim = self._running[-1]
            self._preempt(victim, batch)
            if victim is r:
                return False
        r.block_table.extend(self.blocks.allocate(need))
        return True

    def _admit(self, batch: Batch, budget: int) -> None:
        bs = self.blocks.block_size
        # A sequence that samples this step and holds a multiple of block_size tokens needs a new block
        # next step; keeping those free avoids admitting a request only to preempt it one step later.
        reserve = sum(1 for s in batch.seqs if s.want_logits and s.request.num_tokens % bs == 0)
        room = _Room(budget, reserve, {r.adapter for r in self._running if r.adapter is not None})
        changed = False
        # Background requests are never "starved": they must not hold back normal admissions.
        starved = sorted(
            (
                r
                for r in self._waiting
                if r.priority == 0 and self._step - r.waiting_since >= self.max_wait_steps
            ),
            key=lambda r: r.waiting_since,
        )
        for r in starved:
            changed = True
            if self._try_admit(r, room, batch) is not _Verdict.ADMITTED and not r.is_finished:
                break  # nothing overtakes a starved request: the running set drains until it fits
        else:
            # Normal requests first (queue order), then background ones, only if no normal one is left
            # waiting and within half the seats, so that they take spare capacity and nothing else.
            queue = sorted((r for r in self._waiting if r.state is not RequestState.RUNNING), key=_priority)
            seats = max(1, self.max_num_seqs // 2) - sum(r.priority > 0 for r in self._running)
            normal_left = False
            for r in queue:
                if r.priority > 0 and (normal_left or seats <= 0):
                    break
                verdict = self._try_admit(r, room, batch)
                changed = changed or verdict is _Verdict.ADMITTED or r.is_finished
                if verdict is _Verdict.ADMITTED:
                    seats -= r.priority > 0
                elif r.priority == 0 and not r.is_finished:
                    normal_left = True
                if verdict is _Verdict.STOP:
                    break
        if changed:
            self._waiting = deque(
                r for r in self._waiting if r.state in (RequestState.WAITING, RequestState.PREEMPTED)
            )

    def _try_admit(self, r: Request, room: _Room, batch: Batch) -> _Verdict:
        if room.budget <= 0 or len(self._running) >= self.max_num_seqs:
            return _Verdict.STOP
        if self._fail_if_never_fits(r, batch):
            return _Verdict.SKIP
        slot = -1
        if r.adapter is not None:
            resident = self.residency.slot_of(r.adapter)
            if resident is None:
                self._ask_load(r.adapter)
                return _Verdict.SKIP
            self._load_asked.pop(r.adapter, None)
            if r.adapter not in room.active and len(room.active) >= self.max_active_adapters:
                return _Verdict.SKIP
            slot = resident
        hits = self._cached_prefix(r)
        need = self.blocks.blocks_needed(r.num_tokens, len(hits))
        if need + room.reserve + self.blocks.num_idle(hits) > self.blocks.num_free:
            return _Verdict.STOP
        self.blocks.acquire(hits)
        r.block_table = hits + self.blocks.allocate(need)
        r.num_computed = len(hits) * self.blocks.block_size
        r.num_published_blocks = len(hits)
        if self.namespace_of is not None:
            self.prefix_queries += r.num_tokens
            self.prefix_hits += r.num_computed
        r.num_cached_tokens = min(r.num_computed, len(r.prompt_token_ids))
        r.state, r.slot, r.admitted_step = RequestState.RUNNING, slot, self._step
        if r.adapter is not None:
            self.residency.pin(r.adapter)
            room.active.add(r.adapter)
        bisect.insort(self._running, r, key=_run_order)
        n = min(r.num_tokens - r.num_computed, room.budget, self._chunk(r))
        room.budget -= n
        if r.num_computed + n == r.num_tokens and r.num_tokens % self.blocks.block_size == 0:
            room.reserve += 1
        batch.seqs.append(self._seq(r, n))
        return _Verdict.ADMITTED

    def _cached_prefix(self, r: Request) -> list[int]:
        """The cached blocks `r` can start from (none without prefix caching). At least the last token
        stays uncached: a request must compute one token to get logits."""
        if self.namespace_of is None:
            return []
        namespace = self.namespace_of(r.adapter)
        if r.namespace != namespace:  # first admission, or the adapter was reloaded with other weights
            r.namespace, r.block_keys = namespace, []
        bs = self.blocks.block_size
        max_hit = (r.num_tokens - 1) // bs
        if len(r.block_keys) < max_hit:  # a request kept waiting is looked up every step: hash once
            extend_keys(r.block_keys, r.token_ids_between(0, max_hit * bs), max_hit, bs, namespace)
        return self.blocks.lookup(r.block_keys[:max_hit])

    def _publish(self, r: Request) -> None:
        """Key the blocks of `r` that a completed step has filled, so later requests can reuse them."""
        if r.namespace is None or self.namespace_of is None:
            return
        bs = self.blocks.block_size
        full = r.num_computed // bs
        if full <= r.num_published_blocks:
            return
        extend_keys(r.block_keys, r.token_ids_between(0, full * bs), full, bs, r.namespace)
        for i in range(r.num_published_blocks, full):
            self.blocks.publish(r.block_table[i], r.block_keys[i])
        r.num_published_blocks = full

    def _ask_load(self, adapter: str) -> None:
        """request_load once per adapter; again only after max_wait_steps (in case the load was lost,
        e.g. loaded and evicted before this scheduler saw it resident)."""
        asked = self._load_asked.get(adapter)
        if asked is None or self._step - asked >= max(self.max_wait_steps, 1):
            self.residency.request_load(adapter)
            self._load_asked[adapter] = self._step

    def _chunk(self, r: Request) -> int:
        return self.prefill_chunk_size if r.priority == 0 else min(self.prefill_chunk_size, BACKGROUND_CHUNK)

    def _seq(self, r: Request, n: int) -> ScheduledSeq:
        start = r.num_computed
        tokens = r.token_ids_between(start, start + n)
        return ScheduledSeq(r, tokens, start, list(r.block_table), r.slot, start + n == r.num_tokens)

    def _release(self, r: Request) -> None:
        """Give back what a running request holds: its blocks, its place in the running set, its pin."""
        self.blocks.free(r.block_table)
        self._running.remove(r)
        if r.adapter is not None:
            self.residency.unpin(r.adapter)

    def _preempt(self, r: Request, batch: Batch) -> None:
        self._release(r)
        r.state, r.num_computed, r.slot = RequestState.PREEMPTED, 0, -1
        r.num_published_blocks = 0
        r.num_preemptions += 1
        r.waiting_since = self._step
        self._waiting.appendleft(r)  # newest preempted first, so older ones end up in front
        batch.preempted.append(r)

    def _finish(self, r: Request, reason: str, error: str | None = None) -> None:
        if r.state is RequestState.RUNNING:
            self._release(r)
        elif r.state in (RequestState.WAITING, RequestState.PREEMPTED):
            self._waiting.remove(r)
        r.state, r.finish_reason, r.error = RequestState.FINISHED, reason, error
        self._live.pop(r.request_id, None)
