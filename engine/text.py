"""The engine's text side: the tokenizer, the EOS ids, prompts (plain text and chat messages, through
the adapter's own chat template when it ships one), and each request's output text stream (incremental
detokenizer + stop strings). No model compute here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..adapter_cache.sources import AdapterSources
from ..errors import InvalidRequestError
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .loader import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer_in_background(model_dir: Path) -> Future[Any | None]:
    """Start loading the tokenizer in a thread of its own (it is mostly imports, which overlap with
    the weight copies of the start); the future's result is None for a weights-only directory."""
    job = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-load")
    future = job.submit(_load_tokenizer_if_present, model_dir)
    job.shutdown(wait=False)
    return future


def _load_tokenizer_if_present(model_dir: Path) -> Any | None:
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return None  # weights-only directory: prompts must be token ids
    return load_tokenizer(model_dir)


def read_eos_token_ids(model_dir: Path, tokenizer: Any | None) -> set[int]:
    """generation_config.json's eos_token_id (one id or a list) plus the tokenizer's own."""
    ids: set[int] = set()
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def read_adapter_chat_template(adapter_dir: Path) -> str | None:
    """The chat template an adapter ships: chat_template.jinja, else chat_template in its
    tokenizer_config.json (of a list of named templates, the one named "default")."""
    if (adapter_dir / "chat_template.jinja").is_file():
        return (adapter_dir / "chat_template.jinja").read_text()
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return None
    found = json.loads((adapter_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if isinstance(found, list):
        found = next((t.get("template") for t in found if t.get("name") == "default"), None)
    return found if isinstance(found, str) else None


class RequestText:
    """One request's output text: each generated token goes through the incremental detokenizer, then
    the stop-string matcher; `take()` hands out what is safe to stream (never past a stop string, never
    half a character)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stops = StopMatcher(stops)
        self._pending = ""  # safe to stream, not yet taken

    def add(self, token_id: int) -> bool:
        """Append one generated token; True when a stop string ended the text."""
        check = self._stops.add(self._detok.add(token_id))
        self._pending += check.emit
        return check.stopped

    def finish(self) -> bool:
        """The request ends for another reason (EOS, max_tokens): release the held-back text (an
        incomplete character, a possible stop-string prefix). True when that text completes a stop
        string after all (the request then finishes with "stop")."""
        check = self._stops.add(self._detok.flush())
        self._pending += check.emit
        if check.stopped:
            return True
        self._pending += self._stops.flush().emit
        return False

    def take(self) -> str:
        text, self._pending = self._pending, ""
        return text


class TextCodec:
    """Text in and out for one base model: `tokenizer` is None for a weights-only model directory
    (prompts must then be token ids and outputs carry no text)."""

    def __init__(self, model_dir: Path, tokenizer: Any | None, adapter_sources: AdapterSources) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = read_eos_token_ids(model_dir, tokenizer)
        self._adapter_sources = adapter_sources
        self._chat_templates: dict[str, str | None] = {}  # adapter -> the chat template it ships, if any

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own EOS id (what clients see), None without a tokenizer."""
        return None if self.tokenizer is None else self.tokenizer.eos_token_id

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._require_tokenizer("prompt").encode(prompt)
        return list(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self._require_tokenizer(None).decode(token_ids)

    def chat_prompt(self, messages: list[dict[str, str]], adapter: str | None) -> list[int]:
        """Token ids of `messages` through the chat template, with the assistant turn opened. `adapter`
        (None = the base model) uses its own template when it ships one, else the base tokenizer's."""
        template = None if adapter is None else self.adapter_chat_template(adapter)
        if self.tokenizer is None or not (template or getattr(self.tokenizer, "chat_template", None)):
            raise InvalidRequestError("this model has no chat template", param="messages")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=template
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def adapter_chat_template(self, adapter: str) -> str | None:
        """The template `adapter` ships (read once); raises for unknown or escaping names."""
        if adapter not in self._chat_templates:
            self._chat_templates[adapter] = read_adapter_chat_template(self._adapter_sources.resolve(adapter))
        return self._chat_templates[adapter]

    def request_text(self, prompt_token_ids: Sequence[int], stops: Sequence[str]) -> RequestText | None:
        """A new request's output text stream; None without a tokenizer (no text, no stop strings)."""
        if self.tokenizer is None:
            return None
        return RequestText(self.tokenizer, prompt_token_ids, stops)

    def _require_tokenizer(self, param: str | None) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass token ids", param=param)
        return self.tokenizer
