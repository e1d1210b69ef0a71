"""gpu_check stage 4: end to end on a tiny random Llama with mixed adapters (tests/tiny_models.py: real
PEFT adapters of different ranks and targets, plus base-only requests in the same batch).

  1. float32: the engine's greedy tokens on CUDA equal its tokens on CPU and transformers + PEFT's.
  2. bf16 on CUDA: the runner's logits at the prompt's last position and after each of 8 decode steps
     (paged KV, fp32 scores) against transformers + PEFT in float32 on the same device: the error must
     stay within BF16_ERR_FACTOR times that of transformers + PEFT in bf16 on the same sequence.

    python benchmarks/gpu_e2e.py --out OUT/e2e.json

Without CUDA both parts run on the CPU (part 1 then checks CPU against transformers + PEFT).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_models

ADAPTERS = [("qv8", 8, 16, ["q_proj", "v_proj"], False), ("all16", 16, 32, "all-linear", False),
            ("kdown12", 12, 6, ["k_proj", "down_proj"], True), ("mlp2", 2, 4, ["gate_proj", "up_proj", "down_proj"], False)]  # fmt: skip
DECODE_STEPS = 8
# bf16: max |logit - float32 PEFT logit| over the prompt and 8 decode steps may be at most this many times
# transformers + PEFT's own bf16 error on the same sequence
BF16_ERR_FACTOR = 2.0


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 17, 3, 30, 9)]


def greedy_tokens(base: Path, adapters: dict[str, Path], which: list[str | None], device: str) -> list[list[int]]:
    from loraplex.config import Config
    from loraplex.engine.engine import Engine
    from loraplex.scheduler.sampling_params import SamplingParams

    cfg = Config(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32",
                 device=device, max_lora_rank=16, kv_cache_gib=0.25)  # fmt: skip
    engine = Engine(cfg)
    out = engine.generate(prompts(384), which, SamplingParams(max_tokens=12, ignore_eos=True))
    return [r.token_ids for r in out]


def bf16_logits_check(base: Path, adapters: dict[str, Path], device: str) -> list[dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.config import Config
    from loraplex.engine.engine import Engine
    from loraplex.engine.runner import StepSeq

    cfg = Config(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="bfloat16",
                 device=device, max_lora_rank=16, kv_cache_gib=0.25)  # fmt: skip
    engine = Engine(cfg)
    rows = []
    names: list[str | None] = [*adapters, None]
    for prompt, name in zip(prompts(384), names, strict=False):
        refs = {}
        for dt in (torch.bfloat16, torch.float32):
            m = AutoModelForCausalLM.from_pretrained(base, dtype=dt).to(device).eval()
            refs[dt] = (PeftModel.from_pretrained(m, adapters[name]) if name is not None else m).to(device).eval()
        slot = -1 if name is None else engine.slot_of(name)
        blocks = engine.blocks.allocate(engine.blocks.blocks_needed(len(prompt) + DECODE_STEPS, 0))
        seq, fed, err_ours, err_peft, argmax_same = list(prompt), list(prompt), 0.0, 0.0, 0
        for step in range(DECODE_STEPS + 1):
            start = 0 if step == 0 else len(seq) - 1
            logits = engine.runner.run([StepSeq(fed, start, blocks, slot, True)])[0].float()
            with torch.no_grad():
                ids = torch.tensor([seq], device=device)
                peft16, peft32 = (refs[dt](ids).logits[0, -1].float() for dt in (torch.bfloat16, torch.float32))
            # Both bf16 stacks measured against float32 PEFT: ours may round differently, not worse.
            err_ours = max(err_ours, float((logits - peft32).abs().max()))
            err_peft = max(err_peft, float((peft16 - peft32).abs().max()))
            argmax_same += int(logits.argmax() == peft16.argmax())
            nxt = int(peft32.argmax())  # follow the float32 reference, so every model sees the same sequence
            seq.append(nxt)
            fed = [nxt]
        engine.blocks.free(blocks)
        ok = err_ours <= BF16_ERR_FACTOR * err_peft + 1e-3
        rows.append(dict(adapter=name, prompt_len=len(prompt), ours_vs_f32=err_ours, peft_bf16_vs_f32=err_peft,
                         argmax_agree_with_peft_bf16=f"{argmax_same}/{DECODE_STEPS + 1}", pass_=ok))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/e2e.json")
    args = ap.parse_args()
    from tiny_models import reference_greedy, save_peft_adapter, save_tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = save_tiny_model(root / "base", "llama", seed=0)
        adapters = {name: save_peft_adapter(base, root / name, r, a, t, rs, seed=100 + i)
                    for i, (name, r, a, t, rs) in enumerate(ADAPTERS)}  # fmt: skip
        which = [*adapters, None]
        cpu_tokens = greedy_tokens(base, adapters, which, "cpu")
        dev_tokens = greedy_tokens(base, adapters, which, device) if device != "cpu" else cpu_tokens
        ref_tokens = [reference_greedy(base, adapters.get(n) if n else None, p, 12)[0] for p, n in zip(prompts(384), which, strict=True)]
        f32 = dict(device=device, same_as_cpu=dev_tokens == cpu_tokens, same_as_peft=dev_tokens == ref_tokens,
                   mismatches=[i for i, (a, b) in enumerate(zip(dev_tokens, ref_tokens, strict=True)) if a != b])  # fmt: skip
        print("float32 greedy:", f32, flush=True)
        bf16 = bf16_logits_check(base, adapters, device)
    ok = f32["same_as_cpu"] and f32["same_as_peft"] and all(r["pass_"] for r in bf16)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(float32_greedy=f32, bf16_logits=bf16, bf16_err_factor=BF16_ERR_FACTOR, all_pass=ok), indent=2))
    print("PASS" if ok else "FAIL")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
