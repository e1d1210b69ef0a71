"""Sample one next token per sequence for a whole step in one pass, each row with its own parameters.

Pipeline per row, in this order (the order of Hugging Face's logits processors and vLLM's sampler):

    raw logits --penalties--> penalized --/ temperature--> scaled --top_k, top_p, min_p--> filtered
    greedy rows:  argmax(penalized)           (temperature and the filters never change the argmax)
    sampled rows: one categorical draw from softmax(filtered)

Every filter is a per-row threshold on the scaled logits (keep `scaled >= thr[row]`), so the three
filters combine by taking the largest threshold, and tokens tied at a threshold are all kept.

Seeds: a seeded request owns a CPU `torch.Generator` and draws exactly one uniform number from it per
sampled token (an inverse-CDF draw), whatever else is in the batch, so its text does not depend on
its batch. Unseeded rows draw from the global CPU RNG. Greedy rows draw nothing.

Logprobs follow vLLM's default ("raw logprobs"): `log_softmax` of the model's raw logits, before
penalties, temperature and filters. They describe what the model thinks, not the sampling policy, so
they stay comparable across requests with different sampling settings.

Cost (2 CPU cores, batch 256 x vocab 49152): all-greedy without logprobs is one argmax (~10 ms);
sampling with temperature / top_k / min_p ~0.1 s; top_p avoids a full vocabulary sort (0.5 s) unless
its cut lies beyond the best `_TOP_P_CANDIDATES` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheduler.sampling_params import SamplingParams

_NEG_INF = float("-inf")
# top_p first looks for its cut among this many best tokens (partial top-k), sorting only if needed.
_TOP_P_CANDIDATES = 512
# Block size of the two-level inverse-CDF draw (49152 = 192 blocks of 256).
_BLOCK = 256


@dataclass
class SampleOutput:
    """One step's result; lists are indexed like the batch rows. Logprob fields are None for rows
    that did not ask for logprobs; `top_logprobs[i]` is [(token_id, logprob)], most likely first."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def sample_batch(
    logits: torch.Tensor,  # [B, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]],  # per row: (prompt ids, output ids so far)
) -> SampleOutput:
    """Pick the next token of every row. An all-greedy step without penalties or logprobs is one argmax."""
    batch, vocab = logits.shape
    if not len(params) == len(generators) == len(histories) == batch:
        raise ValueError(
            f"batch of {batch} rows got {len(params)} params, {len(generators)} generators, "
            f"{len(histories)} histories"
        )
    want_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
    penalized = [i for i, p in enumerate(params) if p.has_penalties]
    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    none = [None] * batch
    if not (want_logprobs or penalized or sampled):
        return SampleOutput(logits.argmax(dim=-1).tolist(), list(none), list(none))

    logits = logits.float()
    device = logits.device
    raw_logprobs = None
    if want_logprobs:
        raw_logprobs = logits[_index(want_logprobs, device)].log_softmax(dim=-1)  # [L, vocab]
    if penalized:
        logits = apply_penalties(logits, params, histories)  # a copy: the caller's tensor is untouched
    token_ids = logits.argmax(dim=-1)  # [B]
    if sampled:
        rows = _index(sampled, device)
        token_ids[rows] = _sample_rows(
            logits[rows], [params[i] for i in sampled], [generators[i] for i in sampled]
        )

    chosen = token_ids.tolist()
    logprobs: list[float | None] = list(none)
    top_logprobs: list[list[tuple[int, float]] | None] = list(none)
    if raw_logprobs is not None:
        rows = _index(want_logprobs, device)
        chosen_lp = raw_logprobs.gather(1, token_ids[rows][:, None]).squeeze(1).tolist()  # [L]
        max_k = max(params[i].logprobs or 0 for i in want_logprobs)
        top_ids: list[list[int]] = [[] for _ in want_logprobs]
        top_vals: list[list[float]] = [[] for _ in want_logprobs]
        if max_k > 0:
            top = raw_logprobs.topk(min(max_k, vocab), dim=-1)  # values, indices: [L, max_k]
            top_ids, top_vals = top.indices.tolist(), top.values.tolist()
        for j, i in enumerate(want_logprobs):
            k = params[i].logprobs or 0
            logprobs[i] = chosen_lp[j]
            top_logprobs[i] = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
    return SampleOutput(chosen, logprobs, top_logprobs)


def apply_penalties(
    logits: torch.Tensor,  # [B, vocab]
    params: list[SamplingParams],
    histories: list[tuple[list[int], list[int]]],
) -> torch.Tensor:  # [B, vocab], a new tensor
    """Repetition penalty (tokens of prompt + output), then frequency and presence (output only).

    Penalties only touch the logits of tokens a row has seen, so the work is proportional to the
    histories, not to batch x vocab: the histories become flat (row, token) keys, `unique` merges
    repeats (and counts them), and one gather / scatter updates those entries. No Python loop runs
    over the vocabulary or over the tokens' logits.
    """
    vocab = logits.shape[1]
    device = logits.device
    out = logits.clone()

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        rows, tokens, _ = _unique_pairs(
            rep_rows, [histories[i][0] + histories[i][1] for i in rep_rows], vocab, device
        )
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[rows]  # [N]
        seen = out[rows, tokens]  # [N]
        out[rows, tokens] = torch.where(seen > 0, seen / penalty, seen * penalty)

    count_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if count_rows:
        rows, tokens, counts = _unique_pairs(count_rows, [histories[i][1] for i in count_rows], vocab, device)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[rows]  # [N]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[rows]  # [N]
        # every listed token occurs (counts >= 1), so the presence term is presence * 1
        out[rows, tokens] -= frequency * counts.to(out.dtype) + presence
    return out


def _sample_rows(
    logits: torch.Tensor,  # [S, vocab] penalized logits of the sampled rows
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:  # [S] int64 token ids
    num_rows, vocab = logits.shape
    device = logits.device
    temps = torch.tensor([p.temperature for p in params], device=device)  # [S]
    scaled = logits / temps[:, None]  # [S, vocab]
    threshold = torch.full((num_rows,), _NEG_INF, device=device)  # [S]

    # min_p: p >= min_p * p_max  <=>  scaled >= max(scaled) + log(min_p); log(0) = -inf keeps all.
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)  # [S]
        threshold = torch.maximum(threshold, scaled.max(dim=-1).values + min_p.log())

    # top_k alone needs only the k-th largest value: a partial top-k, no sort.
    k_only = [j for j, p in enumerate(params) if 0 < p.top_k < vocab and p.top_p >= 1.0]
    if k_only:
        index = _index(k_only, device)
        ks = torch.tensor([params[j].top_k for j in k_only], device=device)  # [K]
        best = scaled[index].topk(int(ks.max()), dim=-1).values  # [K, max_k], descending
        threshold[index] = torch.maximum(threshold[index], best.gather(1, (ks - 1)[:, None]).squeeze(1))

    p_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if p_rows:
        index = _index(p_rows, device)
        cut = _top_p_threshold(
            scaled[index], [params[j].top_k for j in p_rows], [params[j].top_p for j in p_rows]
        )
        threshold[index] = torch.maximum(threshold[index], cut)

    probs = scaled.softmax(dim=-1)  # [S, vocab]
    if bool(torch.isfinite(threshold).any()):
        probs = probs.masked_fill(scaled < threshold[:, None], 0.0)  # unnormalized: the draw rescales
    return _draw(probs, _uniform(generators, device))


def _top_p_threshold(
    scaled: torch.Tensor,  # [P, vocab] temperature-scaled logits of the rows with top_p < 1
    top_k: list[int],  # 0 = none
    top_p: list[float],
) -> torch.Tensor:  # [P] keep tokens with scaled >= threshold
    """Smallest set of best tokens whose mass reaches top_p, after the row's top_k cut (the filters run
    in that order, so top_p sees the top-k set renormalized).

    A full sort of the vocabulary is the slow part of sampling (0.5 s for 256 x 49152 on 2 cores), and
    top_p almost always stops within the first few hundred tokens: look at the best
    `_TOP_P_CANDIDATES` first (a partial top-k) and sort fully only the rows they do not settle.
    """
    num_rows, vocab = scaled.shape
    device = scaled.device
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)  # [P], vocab = none
    ps = torch.tensor(top_p, device=device)  # [P]
    log_norm = scaled.logsumexp(dim=-1)  # [P]
    width = min(vocab, max(_TOP_P_CANDIDATES, 2 * max((k for k in top_k if 0 < k < vocab), default=0)))
    threshold = torch.empty(num_rows, device=device)
    if width < vocab:
        best = scaled.topk(width, dim=-1).values  # [P, width], descending
        cut, settled = _top_p_cut(best, log_norm, ks, ps, vocab)
        threshold[settled] = cut[settled]
        rest = (~settled).nonzero().squeeze(1)  # [R]
    else:
        rest = torch.arange(num_rows, device=device)
    if rest.numel():
        ordered = scaled[rest].sort(dim=-1, descending=True).values  # [R, vocab]
        threshold[rest] = _top_p_cut(ordered, log_norm[rest], ks[rest], ps[rest], vocab)[0]
    return threshold


def _top_p_cut(
    best: torch.Tensor,  # [P, W] the W largest scaled logits, descending (W = vocab: all of them)
    log_norm: torch.Tensor,  # [P] logsumexp of the whole row
    ks: torch.Tensor,  # [P] top_k, vocab when off; k <= W unless off
    ps: torch.Tensor,  # [P] top_p
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # threshold [P], settled [P] bool (the window decided it)
    width = best.shape[1]
    has_k = ks <= width
    kth = torch.where(has_k, best.gather(1, (ks.clamp(max=width) - 1)[:, None]).squeeze(1), _NEG_INF)  # [P]
    probs = (best - log_norm[:, None]).exp().masked_fill(best < kth[:, None], 0.0)  # [P, W], of the full row
    kept_mass = torch.where(ks < vocab, probs.sum(dim=-1), 1.0)  # [P] mass of the top-k set
    mass = probs.cumsum(dim=-1)  # [P, W], non-decreasing
    # tokens before the one whose mass crosses top_p, plus that one
    num_keep = (mass < (ps * kept_mass)[:, None]).sum(dim=-1) + 1  # [P]
    settled = num_keep <= width
    if width < vocab:  # the top-k set must lie inside the window: no tie with the k-th value beyond it
        settled &= ~has_k | (best[:, -1] < kth)
    else:
        settled[:] = True
    threshold = best.gather(1, (num_keep.clamp(max=width) - 1)[:, None]).squeeze(1)  # [P]
    return torch.maximum(threshold, kth), settled


def _draw(
    weights: torch.Tensor,  # [S, vocab] float32 >= 0, unnormalized, at least one > 0 per row
    uniform: torch.Tensor,  # [S] float64 in [0, 1)
) -> torch.Tensor:  # [S] int64: token t with probability weights[t] / sum(weights)
    """Inverse-CDF draw with one uniform number per row, in two levels for precision and speed.

    A float32 cumsum over 49152 tokens rounds away every probability below half an ulp of the running
    sum (~3e-8), a systematic bias against the tail; a float64 cumsum costs 3x. So: float32 sums of
    blocks of `_BLOCK` tokens (relative error ~1e-7 per block, no token dropped), a float64 cumsum over
    the blocks to pick one, then a float64 cumsum inside that block only. Zero-weight tokens are never
    picked: the search takes the first cumulative value strictly above the target.
    """
    num_rows, vocab = weights.shape
    pad = (-vocab) % _BLOCK
    if pad:  # zero weights are never drawn
        weights = torch.nn.functional.pad(weights, (0, pad))
    blocks = weights.view(num_rows, -1, _BLOCK)  # [S, NB, BLOCK]
    block_mass = blocks.sum(dim=-1).double()  # [S, NB]
    block_cdf = block_mass.cumsum(dim=-1)  # [S, NB]
    block = _search(block_cdf, uniform * block_cdf[:, -1])  # [S]
    rows = torch.arange(num_rows, device=weights.device)
    # where the target fell inside the chosen block, as a fraction of that block's mass
    before = block_cdf[rows, block] - block_mass[rows, block]  # [S]
    fraction = ((uniform * block_cdf[:, -1] - before) / block_mass[rows, block]).clamp(0.0, 1.0)  # [S]
    inner_cdf = blocks[rows, block].double().cumsum(dim=-1)  # [S, BLOCK]
    inner = _search(inner_cdf, fraction * inner_cdf[:, -1])  # [S]
    return block * _BLOCK + inner


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # cdf [S, N], target [S] -> [S]
    """First index whose cumulative value is > target; the target is capped just below the total so
    rounding can never run past the last token with weight."""
    total = cdf[:, -1]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)


def _uniform(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:  # [S] float64
    """One U[0, 1) number per row. Seeded rows: exactly one draw from their own CPU generator per
    sampled token, whatever the batch. Unseeded rows: one batched draw from the global CPU RNG."""
    uniform = torch.rand(len(generators), dtype=torch.float64)
    for j, g in enumerate(generators):
        if g is not None:
            uniform[j] = torch.rand((), dtype=torch.float64, generator=g)
    return uniform.to(device)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:  # [len(rows)] int64
    return torch.tensor(rows, dtype=torch.long, device=device)


def _unique_pairs(
    rows: list[int], tokens: list[list[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # rows [N], tokens [N], counts [N]
    """Distinct (row, token) pairs with how often each occurs, e.g. rows [0, 2], tokens [[5, 5], [7]]
    -> rows [0, 2], tokens [5, 7], counts [2, 1]. Keys row * vocab + token make `unique` do the work."""
    lengths = torch.tensor([len(toks) for toks in tokens], dtype=torch.long, device=device)  # [R]
    row_ids = torch.repeat_interleave(_index(rows, device), lengths)  # [M]
    flat = _index([t for toks in tokens for t in toks], device)  # [M]
    if flat.numel() and not 0 <= int(flat.min()) <= int(flat.max()) < vocab:
        # keys would silently spill into another row's tokens
        raise ValueError(f"a history holds a token id outside the vocabulary [0, {vocab})")
    keys, counts = torch.unique(row_ids * vocab + flat, return_counts=True)  # [N], [N]
    return keys // vocab, keys % vocab, counts


def sample(
    logits: torch.Tensor,  # [B, vocab] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Token ids only, with empty histories (penalties then have nothing to act on). Kept for callers
    that predate `sample_batch`; new code should pass histories to `sample_batch`."""
    return sample_batch(logits, params, generators, [([], [])] * len(params)).token_ids


def make_generator(seed: int | None) -> torch.Generator | None:
    """A request's own CPU generator (None without a seed: the row then uses the global RNG)."""
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed)
    return g
