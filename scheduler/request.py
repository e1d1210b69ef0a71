"""A request as the scheduler sees it (pure Python): its tokens, its KV blocks, its state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # admitted: holds KV blocks and pins its adapter's slot
    PREEMPTED = "preempted"  # was running; blocks freed, queued at the front, recomputes from token 0
    FINISHED = "finished"  # done; finish_reason says why ("stop", "length", "error")
    ABORTED = "aborted"  # cancelled by the caller; finish_reason "abort"


@dataclass(eq=False)  # identity equality: `r in running` must never compare token lists
class Request:
    """One generation request. The caller fills the first four fields; the scheduler owns the rest.

    The K/V of `all_token_ids[:num_computed]` are in the cache at `block_table`. A running request
    feeds `all_token_ids[num_computed:]` in the next step(s): one token when decoding, a chunk of
    the prompt (or of prompt + output after a preemption) when prefilling.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # None = base model
    # 0 = normal traffic; larger = background work (shadow runs) that is admitted only when no normal
    # request waits, holds at most half the seats, and is preempted first
    priority: int = 0
    arrival: int = -1  # order of Scheduler.add(); larger = newer (preemption picks the largest)
    output_token_ids: list[int] = field(default_factory=list)
    state: RequestState = RequestState.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # adapter device slot, -1 = base; set at admission (may change after a preemption)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # the message when finish_reason == "error"
    waiting_since: int = 0  # schedule() call at which it last entered the waiting queue (fairness)
    admitted_step: int | None = None  # schedule() call of its latest admission
    num_preemptions: int = 0
    # prefix caching (scheduler/prefix_cache.py): the namespace of its latest admission, the keys of its
    # full blocks under it, how many of its blocks it has published, and the prompt tokens it found cached
    namespace: str | None = None
    block_keys: list[bytes] = field(default_factory=list, repr=False)
    num_published_blocks: int = 0
    num_cached_tokens: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.state in (RequestState.FINISHED, RequestState.ABORTED)

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without concatenating the whole text (decode feeds one token)."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]
