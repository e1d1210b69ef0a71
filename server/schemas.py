"""Request bodies of the OpenAI and LoRAX APIs, parsed by hand into small dataclasses.

Every type or range error is an InvalidRequestError (400) naming the field, e.g. `'max_tokens' must
be an integer >= 1`. Unknown fields are ignored (clients send extras); `user` is read as the sticky-routing subject of an alias; fields whose
meaning we would silently drop (tools, logit_bias, best_of > n...) are refused instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..scheduler.sampling_params import MAX_LOGPROBS, OPENAI_SAMPLING_DEFAULTS
from .errors import bad_field
from .structured import ToolChoice, parse_lorax_response_format, parse_openai_structured, parse_tools

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request
MAX_STOPS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

_MISSING = object()


class Fields:
    """Typed reads from one JSON object; `where` prefixes nested names (`stream_options.include_usage`)."""

    def __init__(self, data: Any, where: str = "") -> None:
        if not isinstance(data, dict):
            raise bad_field(where or "body", "must be a JSON object")
        self.data, self.where = data, where

    def _get(self, name: str) -> tuple[str, Any]:
        return (f"{self.where}.{name}" if self.where else name), self.data.get(name)

    def integer(
        self, name: str, default: int | None = None, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        param, value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_field(param, "must be an integer")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise bad_field(param, _range_words(lo, hi, "an integer"))
        return value

    def number(
        self, name: str, default: float | None = None, lo: float | None = None, hi: float | None = None
    ) -> float | None:
        param, value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad_field(param, "must be a number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise bad_field(param, _range_words(lo, hi, "a number"))
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        param, value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad_field(param, "must be a boolean")
        return value

    def string(self, name: str, default: str | None = None) -> str | None:
        param, value = self._get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise bad_field(param, "must be a string")
        return value

    def obj(self, name: str) -> Fields | None:
        param, value = self._get(name)
        return None if value is None else Fields(value, param)

    def stop(self, name: str = "stop") -> tuple[str, ...]:
        param, value = self._get(name)
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise bad_field(param, "must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOPS:
            raise bad_field(param, f"may hold at most {MAX_STOPS} strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise bad_field(param, f"strings may be at most {MAX_STOP_CHARS} characters long")
        return tuple(stops)

    def refuse(self, name: str, why: str, allowed: tuple = (None,)) -> None:
        """400 when `name` is set to anything but an allowed (no-op) value."""
        param, value = self._get(name)
        if value not in allowed and value != {} and value != []:
            raise bad_field(param, why)


def _range_words(lo: float | None, hi: float | None, what: str) -> str:
    if lo is not None and hi is not None:
        return f"must be {what} in [{lo}, {hi}]"
    return f"must be {what} >= {lo}" if lo is not None else f"must be {what} <= {hi}"


@dataclass
class Sampling:
    """What every API shares: the SamplingParams keywords (max_tokens apart) and how many choices."""

    max_tokens: int | None  # None: the API's default (chat: the rest of the context)
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 1
    stream: bool = False
    include_usage: bool = False

    def resolved(self, model_defaults: dict[str, float]) -> dict[str, Any]:
        """The SamplingParams keywords: the request's own values, else the model's generation-config
        defaults (EngineInfo.sampling_defaults), else OpenAI's."""
        return {**OPENAI_SAMPLING_DEFAULTS, **model_defaults, **self.params}


def _openai_sampling(f: Fields, max_tokens: int | None) -> Sampling:
    params: dict[str, Any] = {
        "frequency_penalty": f.number("frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": f.number("presence_penalty", 0.0, -2.0, 2.0),
        "seed": f.integer("seed", None, 0, MAX_SEED),
        "stop": f.stop(),
        "ignore_eos": f.boolean("ignore_eos"),
        # response_format, structured_outputs, guided_* (server/structured.py)
        "structured": parse_openai_structured(f.data),
    }
    # The fields a model's generation config may default are kept only when the request sets them
    # (Sampling.resolved fills the rest); top_k, min_p and repetition_penalty are vLLM's extensions.
    given = {
        "temperature": f.number("temperature", None, 0.0, 2.0),
        "top_p": f.number("top_p", None, 0.0, 1.0),
        "top_k": f.integer("top_k", None, 0),
        "min_p": f.number("min_p", None, 0.0, 1.0),
        "repetition_penalty": f.number("repetition_penalty", None),
    }
    if given["top_k"] == -1:  # vLLM spells "off" as -1
        given["top_k"] = 0
    params.update({k: v for k, v in given.items() if v is not None})
    n = f.integer("n", 1, 1, MAX_N) or 1
    stream = f.boolean("stream")
    options = f.obj("stream_options")
    include_usage = bool(options and options.boolean("include_usage"))
    f.refuse("logit_bias", "is not supported")
    best_of = f.integer("best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad_field("best_of", "is not supported (it must equal n)")
    return Sampling(max_tokens, params, n, stream, include_usage)


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None
    sampling: Sampling
    user: str | None = None  # the end user: the sticky-routing subject of an alias


def parse_completion(body: Any) -> CompletionRequest:
    f = Fields(body)
    prompt = f.data.get("prompt")
    if prompt is None:
        raise bad_field("prompt", "is required")
    prompts = _prompts(prompt)
    max_tokens = f.integer("max_tokens", 16, 1)
    sampling = _openai_sampling(f, max_tokens)
    if len(prompts) * sampling.n > MAX_CHOICES:
        raise bad_field("n", f"times the number of prompts must be at most {MAX_CHOICES}")
    logprobs = f.integer("logprobs", None, 0, MAX_LOGPROBS)
    echo = f.boolean("echo")
    if echo and logprobs is not None:
        raise bad_field("echo", "with logprobs is not supported (prompt logprobs are not computed)")
    f.refuse("suffix", "is not supported", (None, ""))
    return CompletionRequest(f.string("model"), prompts, echo, logprobs, sampling, f.string("user"))


def _prompts(prompt: Any) -> list[str | list[int]]:
    """str | [str] | [int] | [[int]] -> a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            out: list[str | list[int]] = list(prompt)
        elif all(_is_int(t) for t in prompt):
            out = [list(prompt)]
        elif all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            out = [list(p) for p in prompt]
        else:
            out = []
        if out and len(out) <= MAX_CHOICES:
            return out
        if len(out) > MAX_CHOICES:
            raise bad_field("prompt", f"may hold at most {MAX_CHOICES} prompts")
    raise bad_field(
        "prompt", "must be a string, a list of strings, a list of token ids or a list of such lists"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict[str, str]]
    logprobs: bool
    top_logprobs: int | None
    sampling: Sampling
    user: str | None = None  # the end user: the sticky-routing subject of an alias
    tool: ToolChoice | None = None  # forced tool calls: the output is returned as `tool_calls`


def parse_chat(body: Any) -> ChatRequest:
    f = Fields(body)
    messages = _messages(f.data.get("messages"))
    max_tokens = f.integer("max_tokens", None, 1)
    max_tokens = f.integer("max_completion_tokens", max_tokens, 1)
    sampling = _openai_sampling(f, max_tokens)
    logprobs = f.boolean("logprobs")
    top = f.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad_field("top_logprobs", "needs 'logprobs' set to true")
    tool = parse_tools(f.data)
    if tool is not None:
        if sampling.params["structured"] is not None:
            raise bad_field(
                sampling.params["structured"].param, "cannot be combined with a forced tool call ('tool_choice')"
            )
        sampling.params["structured"] = tool.structured
    return ChatRequest(f.string("model"), messages, logprobs, top, sampling, f.string("user"), tool)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_field("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        mf = Fields(m, f"messages[{i}]")
        role = mf.string("role")
        if role not in CHAT_ROLES:
            raise bad_field(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        out.append({"role": role, "content": _content(mf.data.get("content"), f"messages[{i}].content")})
    return out


def _content(value: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            pf = Fields(part, f"{param}[{j}]")
            if pf.string("type") != "text":
                raise bad_field(f"{param}[{j}].type", "is not supported (only 'text' parts)")
            texts.append(pf.string("text") or "")
        return "".join(texts)
    raise bad_field(param, "must be a string or a list of text parts")


@dataclass
class GenerateRequest:
    """LoRAX / TGI `{"inputs", "parameters": {...}, "stream"}`."""

    inputs: str
    adapter: str | None
    details: bool
    return_full_text: bool
    sampling: Sampling
    truncate: int | None = None  # keep only the last `truncate` prompt tokens
    alternatives: int = 0  # `return_k_alternatives`: top tokens reported beside each generated one
    stream: bool = False  # POST / only: answer as /generate_stream


def parse_generate(body: Any) -> GenerateRequest:
    """Every field lorax-client 0.6.3 sends is accepted; the ones that map are honoured, null or the
    neutral value of the rest is accepted, any other value of those is a 400 naming it."""
    f = Fields(body)
    inputs = f.string("inputs")
    if not inputs:
        raise bad_field("inputs", "is required and must be a non-empty string")
    p = f.obj("parameters") or Fields({}, "parameters")
    source = p.string("adapter_source")
    if source not in (None, "local", "hub"):
        raise bad_field(
            "parameters.adapter_source", "must be 'local' or 'hub' (adapters are served by name)"
        )
    adapter = p.string("adapter_id") or None
    temperature = p.number("temperature", None, 0.0)
    top_p = p.number("top_p", None, 0.0, 1.0)
    top_k = p.integer("top_k", None, 0)
    # TGI samples when asked to, or when any warper differs from its neutral value.
    do_sample = (
        p.boolean("do_sample") or temperature not in (None, 1.0) or (top_p or 1.0) < 1.0 or bool(top_k)
    )
    if temperature == 0:
        do_sample = False
    params: dict[str, Any] = {
        "temperature": (1.0 if temperature is None else temperature) if do_sample else 0.0,
        "top_p": top_p if top_p is not None else 1.0,
        "top_k": top_k or 0,
        "seed": p.integer("seed", None, 0, MAX_SEED),
        "stop": p.stop("stop"),
        "repetition_penalty": p.number("repetition_penalty", 1.0),
        "frequency_penalty": p.number("frequency_penalty", 0.0, -2.0, 2.0),
        "presence_penalty": p.number("presence_penalty", 0.0, -2.0, 2.0),
        "ignore_eos": p.boolean("ignore_eos_token"),
    }
    if params["repetition_penalty"] <= 0:
        raise bad_field("parameters.repetition_penalty", "must be a number > 0")
    best_of = p.integer("best_of", None, 1)
    if best_of not in (None, 1):
        raise bad_field("parameters.best_of", "is not supported (only 1)")
    p.refuse("watermark", "is not supported", (None, False))
    p.refuse("typical_p", "is not supported (typical sampling is not implemented)", (None, 1, 1.0))
    p.refuse("decoder_input_details", "is not supported (no prompt log-probabilities)", (None, False))
    p.refuse("merged_adapters", "is not supported (loraplex serves one adapter per request)")
    p.refuse(
        "api_token",
        "is not supported: the server reads adapters with its own credentials (HF_TOKEN on the server)",
    )
    params["structured"] = parse_lorax_response_format(p.data.get("response_format"))
    max_new = p.integer("max_new_tokens", 20, 1)
    sampling = Sampling(max_new, params)
    return GenerateRequest(
        inputs,
        adapter,
        p.boolean("details"),
        p.boolean("return_full_text"),
        sampling,
        truncate=p.integer("truncate", None, 1),
        alternatives=p.integer("return_k_alternatives", 0, 0, MAX_LOGPROBS) or 0,
        stream=f.boolean("stream"),
    )
