"""What a constrained request asks for (pure Python: the server builds it, the engine compiles it).

`StructuredOutput` names a kind and its text in canonical form, so equal requests share one compiled
grammar (engine/grammar.py caches by `key`), and the API parameter it came from, so that every error
about it (here, or from the grammar compiler later) names that parameter.

Kinds: `json_schema` (a JSON schema, xgrammar enforces it), `json_object` (any JSON object),
`regex`, `choice` (exactly one of the listed strings) and `grammar` (EBNF, xgrammar's GBNF dialect).

xgrammar compiles most of JSON Schema but silently ignores a few keywords; a schema that uses one of
them would be "enforced" without the constraint, so they are refused here with a 400 instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 200_000  # a schema / grammar larger than this is refused before any compile

# Keywords xgrammar 0.2 compiles to nothing (checked against its generated grammar): refused.
_IGNORED_KEYWORDS = {
    "contains": "'contains' is not supported",
    "minContains": "'minContains' is not supported",
    "maxContains": "'maxContains' is not supported",
    "if": "conditional schemas ('if' / 'then' / 'else') are not supported",
    "then": "conditional schemas ('if' / 'then' / 'else') are not supported",
    "else": "conditional schemas ('if' / 'then' / 'else') are not supported",
    "dependentRequired": "'dependentRequired' is not supported",
    "dependentSchemas": "'dependentSchemas' is not supported",
    "dependencies": "'dependencies' is not supported",
    "$dynamicRef": "'$dynamicRef' is not supported",
    "$recursiveRef": "'$recursiveRef' is not supported",
}
# keyword -> how its value holds subschemas: "one" schema, a "list" of them, a "map" name -> schema
_SUBSCHEMAS = {
    "items": "one",
    "additionalProperties": "one",
    "not": "one",
    "propertyNames": "one",
    "unevaluatedProperties": "one",
    "unevaluatedItems": "one",
    "prefixItems": "list",
    "anyOf": "list",
    "oneOf": "list",
    "allOf": "list",
    "properties": "map",
    "patternProperties": "map",
    "$defs": "map",
    "definitions": "map",
}


@dataclass(frozen=True)
class StructuredOutput:
    kind: str
    spec: str  # canonical text: compact sorted JSON for schemas and choices, the pattern, the EBNF
    param: str = "response_format"  # the API parameter it came from (named in every error about it)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(f"unknown structured output kind {self.kind!r}", param=self.param)
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                f"is too large ({len(self.spec)} characters, limit {MAX_SPEC_CHARS})", param=self.param
            )

    @property
    def key(self) -> tuple[str, str]:
        """The compile-cache key: equal keys compile to the same grammar."""
        return self.kind, self.spec

    @property
    def choices(self) -> list[str]:
        return json.loads(self.spec) if self.kind == "choice" else []

    # ---- constructors that validate (each raises InvalidRequestError naming `param`) ------------
    @classmethod
    def json_schema(cls, schema: Any, param: str) -> StructuredOutput:
        if isinstance(schema, bool) and schema:
            return cls.json_object(param)  # `true` accepts any JSON; an object is what clients want
        if not isinstance(schema, dict):
            raise InvalidRequestError(f"'{param}' must be a JSON schema object", param=param)
        check_schema(schema, param)
        return cls("json_schema", json.dumps(_canonical(schema), separators=(",", ":")), param)

    @classmethod
    def json_object(cls, param: str) -> StructuredOutput:
        return cls("json_object", "", param)

    @classmethod
    def regex(cls, pattern: Any, param: str) -> StructuredOutput:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError(f"'{param}' must be a non-empty regular expression", param=param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, options: Any, param: str) -> StructuredOutput:
        if not isinstance(options, list) or not options:
            raise InvalidRequestError(f"'{param}' must be a non-empty list of strings", param=param)
        if not all(isinstance(o, str) and o for o in options):
            raise InvalidRequestError(f"'{param}' must hold only non-empty strings", param=param)
        return cls("choice", json.dumps(list(dict.fromkeys(options)), ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: Any, param: str) -> StructuredOutput:
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"'{param}' must be a non-empty EBNF grammar", param=param)
        return cls("grammar", text, param)


def _canonical(schema: Any, in_properties: bool = False) -> Any:
    """Keys sorted at every level except the names under `properties`, whose order is the order the
    output gives them (xgrammar emits properties as declared); so only meaningful changes change a key."""
    if isinstance(schema, dict):
        items = schema.items() if in_properties else sorted(schema.items())
        return {k: _canonical(v, k == "properties" and not in_properties) for k, v in items}
    if isinstance(schema, list):
        return [_canonical(v) for v in schema]
    return schema


def check_schema(schema: Any, param: str, path: str = "#") -> None:
    """Refuse what xgrammar would not enforce: the keywords above, `uniqueItems: true`, `$ref` outside
    this document, and `allOf` over several schemas. Structural errors (a bad type, minItems over
    maxItems, a `$ref` to nothing) are left to the compiler, whose message names them."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidRequestError(f"'{param}': the schema at {path} must be an object or a boolean", param=param)
    for keyword, why in _IGNORED_KEYWORDS.items():
        if keyword in schema:
            raise InvalidRequestError(f"'{param}': unsupported keyword at {path}: {why}", param=param)
    if schema.get("uniqueItems") is True:
        raise InvalidRequestError(
            f"'{param}': unsupported keyword at {path}: 'uniqueItems' is not supported", param=param
        )
    ref = schema.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise InvalidRequestError(
            f"'{param}': unsupported $ref {ref!r} at {path}: only references inside the schema ('#/...')",
            param=param,
        )
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        raise InvalidRequestError(
            f"'{param}': unsupported keyword at {path}: 'allOf' with more than one schema", param=param
        )
    for keyword, shape in _SUBSCHEMAS.items():
        value = schema.get(keyword)
        if value is None:
            continue
        where = f"{path}/{keyword}"
        if shape == "list" or (keyword == "items" and isinstance(value, list)):  # draft-4 tuple items
            if not isinstance(value, list):
                raise InvalidRequestError(f"'{param}': {where} must be a list of schemas", param=param)
            for i, sub in enumerate(value):
                check_schema(sub, param, f"{where}/{i}")
        elif shape == "one":
            check_schema(value, param, where)
        else:
            if not isinstance(value, dict):
                raise InvalidRequestError(f"'{param}': {where} must be an object", param=param)
            for name, sub in value.items():
                check_schema(sub, param, f"{where}/{name}")
