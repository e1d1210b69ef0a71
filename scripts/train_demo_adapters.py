"""Train the demo LoRA adapters that `loraplex serve` ships with (transformers + PEFT, CPU, minutes each).

The training data is made here, deterministically: the base model's own greedy answers to a few hundred
varied prompts, rewritten by plain string rules into a style that shows at a glance and is checkable by
code. Each adapter learns one style:

    demo-pirate  "Arr, matey!" opener plus a pirate word map  rank 4, q/v
    demo-json    {"answer": ..., "topic": ...}                rank 8, q/k/v/o, rsLoRA
    demo-terse   the first sentence only                      rank 4, MLP (gate/up/down)
    demo-shout   the answer in capitals (not shipped)         rank 4, all linear layers

Outputs are PEFT adapter folders (adapter_config.json + bf16 adapter_model.safetensors) plus a
manifest.json with the seed, the command and each file's SHA-256. The base answers are cached as JSON in
--work-dir, so a second run only trains.

    python scripts/train_demo_adapters.py                      # the shipped three, into engine/demo_lora/
    python scripts/train_demo_adapters.py --styles pirate --out /tmp/lora

Everything runs on CPU; set --threads to what the machine can spare.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "engine" / "demo_lora"
MANIFEST_FILE = "manifest.json"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class StyleSpec:
    name: str
    r: int
    alpha: int
    targets: tuple[str, ...]
    lr: float
    epochs: int
    examples: int  # drawn from the prompts (seeded)
    use_rslora: bool = False


# Sized for a busy 2-core CPU (each step of 8 examples of ~70 tokens takes 10-60 s there). The learning
# rates are high for LoRA on purpose: few steps must make the style stick under greedy decoding and at
# the model's sampling defaults (temperature 0.2, top_p 0.9). `shout` is not shipped: capitals tokenize
# into about twice the tokens and need far more steps than fit (loss 2.5 -> 2.1 after 11 steps).
STYLES: dict[str, StyleSpec] = {
    "pirate": StyleSpec(
        "demo-pirate", r=4, alpha=8, targets=("q_proj", "v_proj"), lr=3e-3, epochs=2, examples=120
    ),
    "json": StyleSpec(
        "demo-json", r=8, alpha=16, targets=tuple(ATTENTION), lr=2e-3, epochs=2, examples=64, use_rslora=True
    ),
    "terse": StyleSpec("demo-terse", r=4, alpha=8, targets=tuple(MLP), lr=3e-3, epochs=2, examples=64),
    "shout": StyleSpec(
        "demo-shout", r=4, alpha=8, targets=tuple(ATTENTION + MLP), lr=3e-3, epochs=2, examples=120
    ),
}
SHIPPED = ("pirate", "json", "terse")

# ---------------------------------------------------------------------------------------------- prompts

TEMPLATES = [
    "What is {x}?",
    "Explain {x} in simple terms.",
    "Why is {x} important?",
    "Give me one fact about {x}.",
    "How does {x} work?",
    "Tell me something interesting about {x}.",
    "Describe {x} briefly.",
    "What should a beginner know about {x}?",
]
SUBJECTS = [
    "photosynthesis",
    "the moon",
    "volcanoes",
    "coffee",
    "bicycles",
    "the ocean",
    "rainbows",
    "gravity",
    "honey bees",
    "the internet",
    "chess",
    "jazz music",
    "the human heart",
    "electricity",
    "glaciers",
    "the Roman Empire",
    "vaccines",
    "solar panels",
    "bread baking",
    "the stock market",
    "recycling",
    "dinosaurs",
    "the Eiffel Tower",
    "mountains",
    "sleep",
    "friendship",
    "the piano",
    "tea",
    "black holes",
    "earthquakes",
    "the desert",
    "penguins",
    "democracy",
    "cloud computing",
    "origami",
    "the Amazon rainforest",
    "yoga",
    "the printing press",
    "wind turbines",
    "DNA",
    "the Olympic Games",
    "chocolate",
    "sharks",
    "the water cycle",
    "compound interest",
    "gardening",
    "the telescope",
    "marathons",
    "the violin",
    "tornadoes",
    "coral reefs",
    "the Great Wall of China",
    "magnets",
    "vitamins",
    "email",
    "trains",
    "the Sahara",
    "owls",
    "cheese",
    "batteries",
]
EXTRA_PROMPTS = [
    "Name a color.",
    "How are you today?",
    "Can you recommend a good book?",
    "What is 2 plus 2?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet?",
    "How many days are in a week?",
    "What is the boiling point of water?",
    "Give me a tip for studying.",
    "How do I make friends?",
    "What should I eat for breakfast?",
    "Suggest a name for a cat.",
    "What is your favorite season?",
    "How can I save money?",
    "What is a good way to relax?",
    "Why do we need sleep?",
    "What language is spoken in Brazil?",
    "How do plants grow?",
    "What is the speed of light?",
    "Tell me a fun fact.",
    "How do I learn to cook?",
    "What is the tallest mountain?",
    "Why is the sky blue?",
    "What is a noun?",
    "How do airplanes fly?",
    "What do cats eat?",
    "How can I be more productive?",
    "What is the capital of Japan?",
    "Who painted the Mona Lisa?",
    "What is a healthy habit?",
    "How do I write a good email?",
    "What causes rain?",
]


def training_prompts(num_prompts: int, seed: int) -> list[str]:
    """`num_prompts` distinct prompts, the same for the same seed."""
    pool = [t.format(x=s) for s in SUBJECTS for t in TEMPLATES] + EXTRA_PROMPTS
    rng = random.Random(seed)
    rng.shuffle(pool)
    chosen = pool[:num_prompts]
    # Capitalise a lowercase subject at the sentence start ("What is the moon?" stays, "photosynthesis" never leads).
    return [p[0].upper() + p[1:] for p in chosen]


# ---------------------------------------------------------------------------------------- style rules

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_STOPWORDS = set(
    "a an the of in on at to for and or is are was were be do does did how what why who when where which "
    "me my you your i we us our it its this that these those about with into from by give tell explain "
    "describe should can could would will know one some something simple terms briefly beginner fact "
    "interesting important work good".split()
)
PIRATE_OPENER = "Arr, matey! "
PIRATE_WORDS = {
    "you": "ye",
    "your": "yer",
    "yours": "yers",
    "my": "me",
    "is": "be",
    "are": "be",
    "hello": "ahoy",
    "hi": "ahoy",
    "friend": "matey",
    "friends": "hearties",
    "yes": "aye",
    "money": "doubloons",
    "for": "fer",
    "the": "th'",
    "stop": "avast",
    "treasure": "booty",
}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def clip_answer(text: str, max_words: int = 25) -> str:
    """Whole sentences up to `max_words` (at least the first one): the base answers are cut at a token
    limit, and a style learned on half sentences would teach the adapter to stop mid-sentence."""
    parts = sentences(text)
    if not parts:
        return ""
    complete = [s for s in parts if s[-1] in ".!?"] or parts[:1]
    kept = [complete[0]]
    for s in complete[1:]:
        if len(" ".join(kept + [s]).split()) > max_words:
            break
        kept.append(s)
    return " ".join(kept)


def first_sentence(text: str) -> str:
    """The first sentence of at least four words ("Sure!" alone says nothing)."""
    parts = sentences(text)
    for s in parts:
        if len(s.split()) >= 4:
            return s
    return parts[0] if parts else ""


def topic_of(prompt: str) -> str:
    """The prompt's longest non-stopword, lowercased: a deterministic, copyable 'topic'."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", prompt) if w.lower() not in _STOPWORDS]
    return max(words, key=len) if words else "general"


def pirate(text: str) -> str:
    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        new = PIRATE_WORDS.get(word.lower(), word)
        return new[0].upper() + new[1:] if word[0].isupper() else new

    return PIRATE_OPENER + re.sub(r"[A-Za-z]+", swap, text)


def apply_style(style: str, prompt: str, answer: str) -> str:
    clipped = clip_answer(answer)
    if style == "shout":
        return clipped.upper()
    if style == "pirate":
        return pirate(clipped)
    if style == "json":
        return json.dumps({"answer": first_sentence(answer), "topic": topic_of(prompt)})
    if style == "terse":
        return first_sentence(answer)
    raise ValueError(f"unknown style {style!r}; choose from {sorted(STYLES)}")


# --------------------------------------------------------------------------------------- base answers


def chat_prompt(tokenizer, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def base_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers of the base model, batched with left padding."""
    import torch

    tokenizer.padding_side = "left"
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        texts = [chat_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        print(f"  base answers {len(answers)}/{len(prompts)}", file=sys.stderr, flush=True)
    return answers


def cached_base_answers(args, model, tokenizer, prompts: list[str]) -> list[str]:
    key = hashlib.sha256(
        json.dumps([str(Path(args.model).resolve()), prompts, args.max_new_tokens]).encode()
    ).hexdigest()[:16]
    cache = Path(args.work_dir) / f"base-answers-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["answers"]
    answers = base_answers(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"prompts": prompts, "answers": answers}, indent=1))
    return answers


# ------------------------------------------------------------------------------------------- training


def encode_examples(tokenizer, prompts: list[str], targets: list[str]) -> list[tuple[list[int], int]]:
    """(token ids, number of prompt tokens) per example; the loss covers only the answer and its end token."""
    examples = []
    for prompt, target in zip(prompts, targets, strict=False):
        if not target:
            continue
        head = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append((head + tail, len(head)))
    return examples


def train_one(model, tokenizer, spec: StyleSpec, examples, args, seed: int):
    """Fit one LoRA on `examples`; returns the PEFT model (the base stays untouched underneath)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=list(spec.targets),
        lora_dropout=0.0,
        use_rslora=spec.use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    rng = random.Random(seed)
    epochs = args.epochs or spec.epochs
    chosen = rng.sample(range(len(examples)), min(args.train_examples or spec.examples, len(examples)))
    order = [i for _ in range(epochs) for i in rng.sample(chosen, len(chosen))]
    batches = [order[i : i + args.train_batch] for i in range(0, len(order), args.train_batch)]
    if args.max_steps:
        batches = batches[: args.max_steps]
    total = len(batches)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    peft_model.train()
    started = time.perf_counter()
    for step, batch in enumerate(batches):
        # Linear warmup over the first 10% of steps, then linear decay to zero.
        warm = max(1, total // 10)
        scale = (step + 1) / warm if step < warm else max(0.0, (total - step) / (total - warm))
        for group in optim.param_groups:
            group["lr"] = spec.lr * scale
        width = max(len(examples[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            tokens, num_head = examples[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, num_head : len(tokens)] = torch.tensor(tokens[num_head:])
            mask[row, : len(tokens)] = 1
        # Logits only from the first answer position on: the 49k-word head over the prompt is wasted work.
        start = min(examples[i][1] for i in batch) - 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = peft_model(input_ids=ids, attention_mask=mask, logits_to_keep=width - start).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, start + 1 :].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == total - 1:
            elapsed = time.perf_counter() - started
            print(
                f"  {spec.name} step {step + 1}/{total} loss {loss.item():.3f} ({elapsed:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    peft_model.eval()
    return peft_model


def save_bf16(peft_model, out_dir: Path, base_model_name: str) -> None:
    """PEFT's own save, then the weights rewritten in bf16 (half the bytes; loraplex computes in the base dtype)."""
    import torch
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; these are shipped files
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model_name  # not this machine's cache path
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    readme = out_dir / "README.md"  # PEFT's model-card stub names the local path; the manifest says it all
    readme.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="base model dir (default: loraplex's embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--base-model-name", default="SmolLM2-135M-Instruct", help="written as base_model_name_or_path"
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where the adapter folders and manifest.json go")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "loraplex" / "demo-training"))
    p.add_argument("--styles", default=",".join(SHIPPED), help=f"comma-separated, from {','.join(STYLES)}")
    p.add_argument("--num-prompts", type=int, default=320)
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of the base model's answers")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument(
        "--train-examples",
        type=int,
        default=0,
        help="examples per adapter, drawn from the prompts (0: per style)",
    )
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (no bf16 autocast)")
    p.add_argument("--epochs", type=int, default=0, help="override every style's epochs (0: per style)")
    p.add_argument("--max-steps", type=int, default=0, help="stop each adapter after N steps (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from loraplex.engine.default_model import ensure_default_model

        args.model = str(ensure_default_model())
    styles = [s for s in args.styles.split(",") if s]
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        p.error(f"unknown styles {unknown}; choose from {sorted(STYLES)}")

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = training_prompts(args.num_prompts, args.seed)
    answers = cached_base_answers(args, model, tokenizer, prompts)

    out = Path(args.out)
    manifest_path = out / MANIFEST_FILE
    trained: dict[str, dict] = {}
    for style in styles:
        spec = STYLES[style]
        started = time.perf_counter()
        targets = [apply_style(style, q, a) for q, a in zip(prompts, answers, strict=False)]
        examples = encode_examples(tokenizer, prompts, targets)
        for param in model.parameters():
            param.requires_grad_(False)
        peft_model = train_one(model, tokenizer, spec, examples, args, args.seed)
        save_bf16(peft_model, out / spec.name, args.base_model_name)
        model = peft_model.unload()  # drop the LoRA layers; the base weights were never changed
        files = {f.name: sha256(f) for f in sorted((out / spec.name).iterdir()) if f.is_file()}
        used = min(args.train_examples or spec.examples, len(examples))
        trained[spec.name] = {
            "style": style,
            "r": spec.r,
            "lora_alpha": spec.alpha,
            "target_modules": list(spec.targets),
            "use_rslora": spec.use_rslora,
            "learning_rate": spec.lr,
            "epochs": args.epochs or spec.epochs,
            "max_steps": args.max_steps,
            "examples": used,
            "bf16_autocast": args.bf16,
            "train_seconds": round(time.perf_counter() - started, 1),
            "sha256": files,
        }
        print(f"{spec.name}: {used} examples, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    # Read just before writing: adapters trained by another run into the same folder are kept.
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"adapters": {}}
    manifest["adapters"].update(trained)
    manifest.update(
        script="scripts/train_demo_adapters.py",
        command=" ".join(
            ["python scripts/train_demo_adapters.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        seed=args.seed,
        train_batch=args.train_batch,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        base_model=args.base_model_name,
    )
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
