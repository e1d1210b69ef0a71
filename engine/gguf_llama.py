"""A llama-architecture GGUF file -> a Hugging Face model directory, with the `gguf` package only.

What transformers' GGUF loader does, without it: that loader needs `accelerate` (transformers >= 5.24)
and spends ~25 s here (10 s rebuilding the tokenizer through its slow converter, the rest importing and
instantiating a model just to save it). This module reads the file once with `gguf.GGUFReader`
(memory-mapped), dequantizes each tensor with `gguf.quants.dequantize` (the same routine transformers
calls), undoes llama.cpp's Q/K row permutation, and writes:

- `model.safetensors` (bf16, Hugging Face tensor names, tied head left out),
- `config.json` and `generation_config.json` (a `LlamaForCausalLM` config),
- `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` (a byte-level BPE tokenizer built
  from the GGUF vocabulary and merges, the structure transformers writes for the same file).

The result equals transformers' conversion tensor for tensor (tests/test_default_model.py checks that
against transformers where `accelerate` is installed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# GGUF tensor name -> Hugging Face name (`{i}` is the layer index).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user defined. Both become added tokens.
_ADDED_TOKEN_TYPES = (3, 4)


class GGUFConversionError(ValueError):
    """The GGUF file is not a llama-architecture model this converter understands."""


class GGUFLlama:
    """One llama GGUF file, opened memory-mapped; `write(out_dir)` converts it."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = Path(path)
        self.reader = GGUFReader(self.path)
        arch = self.field("general.architecture")
        if arch != "llama":
            raise GGUFConversionError(f"{self.path.name}: architecture {arch!r}, expected 'llama'")

    def field(self, key: str, default: Any = None) -> Any:
        value = self.reader.fields.get(key)
        return default if value is None else value.contents()

    # ---- config ----

    def config(self) -> dict[str, Any]:
        """A transformers `LlamaConfig` as a config.json dict."""
        get = self.field
        num_heads = int(get("llama.attention.head_count"))
        hidden = int(get("llama.embedding_length"))
        head_dim = int(get("llama.rope.dimension_count", hidden // num_heads))
        names = {t.name for t in self.reader.tensors}
        return {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": "blk.0.attn_q.bias" in names,
            "attention_dropout": 0.0,
            "bos_token_id": get("tokenizer.ggml.bos_token_id"),
            "dtype": "bfloat16",
            "eos_token_id": get("tokenizer.ggml.eos_token_id"),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "initializer_range": 0.02,
            "intermediate_size": int(get("llama.feed_forward_length")),
            "max_position_embeddings": int(get("llama.context_length")),
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": num_heads,
            "num_hidden_layers": int(get("llama.block_count")),
            "num_key_value_heads": int(get("llama.attention.head_count_kv", num_heads)),
            "pad_token_id": get("tokenizer.ggml.padding_token_id"),
            "pretraining_tp": 1,
            "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon")),
            "rope_parameters": {"rope_theta": float(get("llama.rope.freq_base", 10000.0)), "rope_type": "default"},
            "tie_word_embeddings": "output.weight" not in names,
            "unk_token_id": get("tokenizer.ggml.unknown_token_id"),
            "use_cache": True,
            "vocab_size": self._vocab_size(),
        }

    def _vocab_size(self) -> int:
        # Only when the header leaves it out: listing the vocabulary decodes ~50k strings.
        size = self.field("llama.vocab_size")
        return int(size) if size is not None else len(self.field("tokenizer.ggml.tokens") or [])

    # ---- weights ----

    def tensors(self, num_heads: int, num_kv_heads: int) -> Iterator[tuple[str, np.ndarray]]:
        """(Hugging Face name, float32 array) for every tensor, dequantized and un-permuted."""
        from gguf.quants import dequantize

        for tensor in self.reader.tensors:
            name = hf_tensor_name(tensor.name)
            weights = dequantize(tensor.data, tensor.tensor_type)  # [rows, cols] float32
            if name.endswith("self_attn.q_proj.weight"):
                weights = unpermute_rows(weights, num_heads)
            elif name.endswith("self_attn.k_proj.weight"):
                weights = unpermute_rows(weights, num_kv_heads)
            yield name, weights

    def write(self, out_dir: Path, *, eos_token: str | None = None, model_max_length: int | None = None) -> None:
        """Write the Hugging Face directory into `out_dir` (which must exist)."""
        import torch
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        config = self.config()
        tokenizer = self.tokenizer_json()
        vocab = tokenizer["model"]["vocab"]
        if eos_token is not None:  # e.g. an instruct model whose turns end with another token
            if eos_token not in vocab:
                raise GGUFConversionError(f"eos token {eos_token!r} is not in the vocabulary")
            config["eos_token_id"] = vocab[eos_token]
        config["pad_token_id"] = config["pad_token_id"] if config["pad_token_id"] is not None else config["eos_token_id"]

        state = {
            name: torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
            for name, w in self.tensors(config["num_attention_heads"], config["num_key_value_heads"])
        }
        if config["tie_word_embeddings"]:
            state.pop("lm_head.weight", None)
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        _write_json(out_dir / "config.json", config)
        _write_json(out_dir / "generation_config.json", {"_from_model_config": True, **ids, "use_cache": True})
        _write_json(out_dir / "tokenizer.json", tokenizer)
        token_of = {i: t for t, i in vocab.items()}
        tokenizer_config: dict[str, Any] = {
            "backend": "tokenizers",
            "bos_token": token_of.get(ids["bos_token_id"]),
            "eos_token": token_of.get(ids["eos_token_id"]),
            "model_max_length": model_max_length or config["max_position_embeddings"],
            "pad_token": token_of.get(ids["pad_token_id"]),
            "tokenizer_class": "TokenizersBackend",
            "unk_token": token_of.get(config["unk_token_id"]),
        }
        _write_json(out_dir / "tokenizer_config.json", {k: v for k, v in tokenizer_config.items() if v is not None})
        template = self.field("tokenizer.chat_template")
        if template:
            (out_dir / "chat_template.jinja").write_text(template)

    # ---- tokenizer ----

    def tokenizer_json(self) -> dict[str, Any]:
        """A `tokenizers` tokenizer.json for the GGUF's byte-level BPE ("gpt2") vocabulary."""
        model = self.field("tokenizer.ggml.model")
        if model != "gpt2":
            raise GGUFConversionError(f"tokenizer model {model!r}: only byte-level BPE ('gpt2') is supported")
        tokens: list[str] = self.field("tokenizer.ggml.tokens")
        types: list[int] = self.field("tokenizer.ggml.token_type", [1] * len(tokens))
        merges: list[str] = self.field("tokenizer.ggml.merges", [])
        add_prefix_space = bool(self.field("tokenizer.ggml.add_space_prefix", False))
        added = [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, (tok, kind) in enumerate(zip(tokens, types, strict=True))
            if kind in _ADDED_TOKEN_TYPES
        ]
        byte_level = {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": True}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": _post_processor(bool(self.field("tokenizer.ggml.add_bos_token", False)), tokens, self),
            "decoder": {**byte_level, "add_prefix_space": True},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {tok: i for i, tok in enumerate(tokens)},
                "merges": [m.split(" ", 1) for m in merges],
            },
        }


def _post_processor(add_bos: bool, tokens: list[str], gguf: GGUFLlama) -> dict[str, Any]:
    single: list[dict[str, Any]] = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair: list[dict[str, Any]] = [*single, {"Sequence": {"id": "B", "type_id": 1}}]
    special: dict[str, Any] = {}
    if add_bos:
        bos_id = int(gguf.field("tokenizer.ggml.bos_token_id"))
        bos = tokens[bos_id]
        single = [{"SpecialToken": {"id": bos, "type_id": 0}}, *single]
        pair = [{"SpecialToken": {"id": bos, "type_id": 0}}, pair[0], {"SpecialToken": {"id": bos, "type_id": 1}}, pair[1]]
        special = {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    match = _GLOBAL_RE.match(gguf_name)
    if match and match.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[match.group(1)]}.{match.group(2)}"
    raise GGUFConversionError(f"unknown llama GGUF tensor {gguf_name!r}")


def unpermute_rows(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary layout of a Q or K projection.

    llama.cpp stores each head's rows as interleaved (real, imaginary) pairs; Hugging Face keeps the
    first half of the head's rows, then the second half. For one head of 4 rows: GGUF rows
    [r0, r2, r1, r3] (pairs (r0, r2), (r1, r3)) -> HF rows [r0, r1, r2, r3].
    """
    rows = weights.shape[0]
    half = rows // num_heads // 2
    # [heads, half, 2, cols] -> [heads, 2, half, cols]
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")
