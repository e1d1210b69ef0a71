"""Structured-output parameters of every API, read into one `StructuredOutput` (the engine compiles it),
and forced tool calls: the grammar their arguments follow, and the parser that turns the constrained
text back into OpenAI `tool_calls` (whole, or as streamed deltas).

Accepted (at most one per request; each error names its parameter):
- OpenAI `response_format`: {"type": "text" | "json_object"} or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
- vLLM `structured_outputs`: {"json" | "regex" | "choice" | "grammar" | "json_object"}, and the older
  `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`
- OpenAI `tools` + `tool_choice` (chat): a named function, or "required" (one or more calls; one with
  `parallel_tool_calls: false`)
- LoRAX `parameters.response_format`: {"type": "json_object", "schema": {...}}
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..scheduler.structured_output import StructuredOutput
from .errors import bad_field

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_\-.]{1,64}$")
_GUIDED = (
    ("guided_json", "json"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
_NEUTRAL_STRUCTURED_KEYS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")


def _build(kind: str, value: Any, param: str) -> StructuredOutput:
    if kind == "json":
        if isinstance(value, str):  # vLLM takes a schema as JSON text too
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise bad_field(param, f"is not valid JSON: {exc}") from exc
        return StructuredOutput.json_schema(value, param)
    if kind == "json_object":
        return StructuredOutput.json_object(param)
    if kind == "regex":
        return StructuredOutput.regex(value, param)
    if kind == "choice":
        return StructuredOutput.choice(value, param)
    return StructuredOutput.grammar(value, param)


def parse_openai_structured(data: dict[str, Any]) -> StructuredOutput | None:
    """The one structured-output request of an OpenAI body (chat or completions), or None."""
    found: list[StructuredOutput] = []
    fmt = data.get("response_format")
    if fmt is not None:
        spec = _response_format(fmt)
        if spec is not None:
            found.append(spec)
    so = data.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_field("structured_outputs", "must be an object")
        for key, value in so.items():
            if value in (None, False) or key in _NEUTRAL_STRUCTURED_KEYS:
                continue
            if key not in _STRUCTURED_KEYS:
                raise bad_field(f"structured_outputs.{key}", "is not supported")
            found.append(_build(key, value, f"structured_outputs.{key}"))
    for name, kind in _GUIDED:
        if data.get(name) is not None:
            found.append(_build(kind, data[name], name))
    if len(found) > 1:
        names = ", ".join(f"'{s.param}'" for s in found)
        raise bad_field(found[1].param, f"conflicts with {names.split(', ')[0]}: give one of {names}")
    return found[0] if found else None


def _response_format(fmt: Any) -> StructuredOutput | None:
    if not isinstance(fmt, dict):
        raise bad_field("response_format", "must be an object")
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_object("response_format")
    if kind != "json_schema":
        raise bad_field("response_format.type", "must be one of 'text', 'json_object', 'json_schema'")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_field("response_format.json_schema", "is required with type 'json_schema' and must be an object")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not _FUNCTION_NAME.match(name)):
        raise bad_field("response_format.json_schema.name", "must be 1-64 letters, digits, '_', '-' or '.'")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_field("response_format.json_schema.strict", "must be a boolean")
    schema = spec.get("schema")
    if schema is None:
        return StructuredOutput.json_object("response_format.json_schema.schema")
    return StructuredOutput.json_schema(schema, "response_format.json_schema.schema")


def parse_lorax_response_format(fmt: Any) -> StructuredOutput | None:
    """LoRAX `parameters.response_format`: {"type": "json_object", "schema": {...} | null}."""
    param = "parameters.response_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_field(param, "must be an object")
    kind = fmt.get("type", "json_object")
    if kind == "text":
        return None
    if kind not in ("json_object", "json", "json_schema"):
        raise bad_field(f"{param}.type", "must be 'json_object'")
    schema = fmt.get("schema")
    if schema is None:
        return StructuredOutput.json_object(param)
    return StructuredOutput.json_schema(schema, f"{param}.schema")


# ---- forced tool calls ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolChoice:
    """How a chat request's output becomes tool calls. `named`: the output is the arguments of
    `function`; "required": a JSON list of {"name", "parameters"} objects, one per call."""

    mode: str  # "named" | "required"
    functions: tuple[str, ...]
    structured: StructuredOutput


def parse_tools(data: dict[str, Any]) -> ToolChoice | None:
    tools, choice = data.get("tools"), data.get("tool_choice")
    if data.get("functions") is not None or data.get("function_call") is not None:
        raise bad_field("functions", "is not supported (use 'tools' with 'tool_choice')")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise bad_field("tool_choice", "needs 'tools'")
        return None
    params = _tool_parameters(tools)
    if choice is None or choice == "auto":
        raise bad_field(
            "tool_choice",
            "'auto' is not supported (the model is not asked whether to call a tool): set tool_choice to "
            "'required' or to {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    if choice == "none":
        return None
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": schema},
                "required": ["name", "parameters"],
            }
            for name, schema in params.items()
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        parallel = data.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise bad_field("parallel_tool_calls", "must be a boolean")
        if not parallel:  # OpenAI's switch for at most one call per reply
            schema["maxItems"] = 1
        return ToolChoice("required", tuple(params), StructuredOutput.json_schema(schema, "tools"))
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise bad_field(
            "tool_choice", "must be 'none', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"
        )
    name = choice["function"].get("name")
    if name not in params:
        raise bad_field("tool_choice.function.name", f"names no function in 'tools': {name!r}")
    return ToolChoice("named", (name,), StructuredOutput.json_schema(params[name], f"tools.{name}.parameters"))


def _tool_parameters(tools: Any) -> dict[str, Any]:
    """{function name: its parameters schema} of a `tools` list, validated."""
    if not isinstance(tools, list):
        raise bad_field("tools", "must be a list of tools")
    out: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_field(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {...}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise bad_field(f"tools[{i}].function.name", "must be 1-64 letters, digits, '_', '-' or '.'")
        if name in out:
            raise bad_field(f"tools[{i}].function.name", f"{name!r} is defined twice")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        StructuredOutput.json_schema(schema, f"tools[{i}].function.parameters")  # validates
        out[name] = schema
    return out


# the text before one call's arguments in "required" mode: `[{"name": "f", "parameters": ` (or `}, {...`)
_CALL_HEAD = re.compile(r'\s*(?:\}\s*)?[\[,]\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*')


@dataclass
class ToolCallParser:
    """Turns the constrained text of one choice into tool calls, incrementally: `feed` the new text,
    get OpenAI tool-call deltas back; `calls` is the whole list so far. Feeding the full text at once
    gives the same calls, so streamed deltas reassemble to the non-streamed reply."""

    tool: ToolChoice
    calls: list[dict[str, Any]] = field(default_factory=list)
    _buf: str = ""
    _pos: int = 0  # text before it is consumed
    _depth: int = -1  # bracket nesting inside the current arguments ("required" mode); -1: between calls
    _in_string: bool = False
    _escaped: bool = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if self.tool.mode == "named":  # the whole output is the arguments of the one function
            if not self.calls:
                deltas.append(self._new_call(self.tool.functions[0]))
            if text:
                self.calls[0]["function"]["arguments"] += text
                deltas.append({"index": 0, "function": {"arguments": text}})
            return deltas
        self._buf += text
        while True:
            if self._depth < 0:
                head = _CALL_HEAD.match(self._buf, self._pos)
                if head is None or head.end() >= len(self._buf):  # wait for the first arguments character
                    break
                deltas.append(self._new_call(json.loads(head.group(1))))
                self._pos, self._depth = head.end(), 0
            start = self._pos
            complete = self._scan_arguments()
            if self._pos > start:
                fragment = self._buf[start : self._pos]
                self.calls[-1]["function"]["arguments"] += fragment
                deltas.append({"index": len(self.calls) - 1, "function": {"arguments": fragment}})
            if not complete:
                break
            self._depth = -1
        return deltas

    def _scan_arguments(self) -> bool:
        """Advance over the arguments object; True once its closing bracket is consumed."""
        buf = self._buf
        while self._pos < len(buf):
            ch = buf[self._pos]
            self._pos += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return True
        return False

    def _new_call(self, name: str) -> dict[str, Any]:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": ""}})
        return {
            "index": len(self.calls) - 1,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
