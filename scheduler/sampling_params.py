"""Request parameters (pure Python: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequestError
from .structured_output import StructuredOutput

# OpenAI's own cap on `top_logprobs`; larger k costs a bigger top-k per step for little use.
MAX_LOGPROBS = 20
# The fields a model's generation_config.json may default for requests that leave them out (vLLM reads
# the same ones), with the plain OpenAI value each takes when neither the request nor the model sets it.
OPENAI_SAMPLING_DEFAULTS: dict[str, float] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; every default leaves the model's distribution untouched.

    temperature 0 means greedy (argmax of the penalized logits). Filters (top_k, top_p, min_p) only
    matter when sampling. Penalties apply to greedy and sampled rows alike:

    - repetition_penalty (Hugging Face semantics, 1.0 = off): for every token seen in prompt + output,
      a positive logit is divided by it and a negative one multiplied by it.
    - frequency_penalty / presence_penalty (OpenAI semantics, 0 = off, range [-2, 2]):
      `logit[t] -= frequency_penalty * count_in_output(t) + presence_penalty * (count_in_output(t) > 0)`.

    logprobs None returns no log-probabilities; k >= 0 returns the chosen token's logprob plus the k
    most likely alternatives (k <= MAX_LOGPROBS).

    structured: the grammar's token mask is applied to the raw logits before everything above, so
    penalties, filters, greedy and sampled draws all choose among the tokens the grammar allows.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    # constrain the output to a JSON schema, regex, choice or grammar (engine/grammar.py); None = free text
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1] (0 disables it)"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 disables it)"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (
                self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
                "logprobs",
                f"must be null or an integer in [0, {MAX_LOGPROBS}]",
            ),
            (self.seed is None or _is_int(self.seed), "seed", "must be an integer"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, param, why in checks:
            if not ok:
                raise InvalidRequestError(f"{param} {why}", param=param)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether the logits of this request depend on its token history."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _is_int(value: object) -> bool:
    # bool is an int subclass; `logprobs=True` or `max_tokens=True` is a client bug worth reporting.
    return isinstance(value, int) and not isinstance(value, bool)
