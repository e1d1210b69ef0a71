"""Tiny random models of every supported architecture and real PEFT adapters for them (test helpers)."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # A wide init spreads the logits, so greedy top-2 margins are clear of float32 rounding.
    initializer_range=0.15,
)
# (name, rank, alpha, target_modules, use_rslora): different ranks and target sets
ADAPTERS = [
    ("qv8", 8, 16, ["q_proj", "v_proj"], False),
    ("attn4", 4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    ("all16", 16, 32, "all-linear", False),
    ("mlp2", 2, 4, ["gate_proj", "up_proj", "down_proj"], False),
    ("kdown12", 12, 6, ["k_proj", "down_proj"], True),
    ("ko1", 1, 2, ["o_proj"], False),
    ("all8rs", 8, 16, "all-linear", True),
]


def make_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kw = dict(COMMON)
    if arch == "llama":
        kw["tie_word_embeddings"] = False
    if arch == "mistral":
        kw["sliding_window"] = None
    if arch in ("qwen2", "qwen3"):
        kw["tie_word_embeddings"] = True
    if arch == "qwen3":
        kw["head_dim"] = 32  # qwen3 decouples head_dim from hidden / heads
    kw.update(overrides)
    return cls(**kw)


def save_tiny_model(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, **overrides)).eval()
    if arch == "qwen2":  # random biases so the qkv-bias path is exercised (init leaves them at zero)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    model.save_pretrained(path)
    return path


def save_peft_adapter(base_dir: Path, out: Path, rank: int, alpha: float, targets, use_rslora: bool, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora, init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():  # PEFT's init_lora_weights=False B is small; scale it so adapters change the argmax
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out)
    return out


def reference_greedy(
    base_dir: Path,
    adapter_dir: Path | None,
    prompt: list[int],
    max_new: int,
    logits_processor: list | None = None,
    eos_token_id: int | None = None,
):
    """transformers (+ PEFT) greedy generation of one request alone: (tokens, min top-2 logit margin).
    `logits_processor` (e.g. xgrammar's) masks the scores; with `eos_token_id` generation stops there."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
            logits_processor=logits_processor or [],
            output_scores=True,
            return_dict_in_generate=True,
        )
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values  # [steps, 2]
    margin = float((top2[:, 0] - top2[:, 1]).min())
    return out.sequences[0, len(prompt) :].tolist(), margin


def live_slot_state(model) -> list[torch.Tensor]:
    """Every slot buffer of every LoRA linear (A and W via weight_ext, B, the row tables), cut to what a
    reader may read: a slot's ranks below its adapter's rank R (the largest of its slice ranks), and for
    lora_b and the A row table below each slice's own rank. Elsewhere a rewrite may leave an earlier
    adapter's values (LoraSlotStack.write); below R, A and the B row table must be zero above a slice's
    rank, since lora_b and the A row table next to them need not be."""
    out = []
    for lin in model.lora_linears():
        slots = lin.slots
        assert slots is not None and lin.lora_at is not None and lin.lora_bt is not None
        num_slots, num_slices, r_max, in_f = slots.lora_a.shape
        a = slots.lora_a.clone()  # [num_slots, num_slices, r_max, in]
        b = slots.lora_b.clone()  # [num_slots, out_total, r_max]
        at = lin.lora_at.clone().view(num_slots, in_f, num_slices, r_max)
        bt = [t.clone().view(num_slots, r_max, -1) for t in lin.lora_bt]
        for s in range(num_slots):
            top = max(slots.slice_ranks[s])
            a[s, :, top:] = 0
            for t in bt:
                t[s, top:] = 0
            for i, r in enumerate(slots.slice_ranks[s]):
                c0, c1 = slots.slice_offsets[i], slots.slice_offsets[i + 1]
                b[s, c0:c1, r:] = 0
                at[s, :, i, r:] = 0
        out += [slots.weight_ext[: slots.out_total], a, b, at, *bt]
    return out
