"""Sample one next token per sequence for a whole step in one pass, each row with its own parameters.

A seeded request draws its noise from its own generator, so its text does not depend on its batch.
"""

from __future__ import annotations

import torch

from ..scheduler.request import SamplingParams


def sample(
    logits: torch.Tensor,  # [B, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    greedy = logits.argmax(dim=-1)  # [B]
    if all(p.temperature == 0 for p in params):
        return greedy.tolist()
    b, vocab = logits.shape
    temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=logits.device)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    sorted_logits, sorted_idx = (logits / temps[:, None]).sort(dim=-1, descending=True)  # [B, vocab]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when it is past top_k, or when the tokens before it already cover top_p (the first stays).
    drop = (ranks >= top_k[:, None]) | ((probs.cumsum(dim=-1) - probs) >= top_p[:, None])
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Exponential race (argmax p / E, E ~ Exp(1)) is a categorical draw; E comes from the row's own generator.
    noise = torch.empty(probs.shape)  # on the host: generators are CPU generators
    for i, g in enumerate(generators):
        noise[i].exponential_(generator=g)
    choice = (probs / noise.to(probs.device)).argmax(dim=-1, keepdim=True)
    sampled = sorted_idx.gather(1, choice).squeeze(1)
    is_greedy = torch.tensor([p.temperature == 0 for p in params], device=logits.device)
    return torch.where(is_greedy, greedy, sampled).tolist()


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g
