"""JSON schemas for the structured-output tests: 32 of them, covering nested objects, arrays with
min/maxItems, enums, const, string patterns and formats, integer / number bounds, required and
optional properties, anyOf / oneOf and $defs / $ref."""

from __future__ import annotations

S = {"type": "string", "maxLength": 6}  # short strings: a tiny random model ends them soon enough

SCHEMAS: list[dict] = [
    # 1-5 flat objects: required / optional, integer and number bounds
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}}, "required": ["x"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}}, "required": ["n"]},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": S}, "required": ["a", "b"]},
    {"type": "object", "properties": {"id": {"type": "integer"}, "note": S}, "required": ["id"]},
    # 6-10 enums and const
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"kind": {"const": "invoice"}, "total": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["kind", "total"]},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3, "max", None, True]}}, "required": ["level"]},
    {"type": "object", "properties": {"v": {"const": {"fixed": [1, 2]}}}, "required": ["v"]},
    {"enum": ["yes", "no", "maybe"]},
    # 11-15 string patterns and formats
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2,3}$"}}, "required": ["code"]},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"]},
    {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}, "required": ["ip"]},
    {"type": "object", "properties": {"uid": {"type": "string", "format": "uuid"}}, "required": ["uid"]},
    # 16-20 arrays with min/maxItems, nested objects
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": S, "admin": {"type": "boolean"}}, "required": ["name", "admin"]}}, "required": ["user"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"points": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}}, "required": ["x", "y"]}, "minItems": 1, "maxItems": 2}}, "required": ["points"]},
    # 21-25 anyOf / oneOf
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}}, "required": ["value"]},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["kind", "side"]},
    ]}}, "required": ["shape"]},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"enum": ["none"]}]},
    {"type": "object", "properties": {"maybe": {"anyOf": [S, {"type": "null"}]}}, "required": ["maybe"]},
    {"type": "object", "properties": {"n": {"type": ["integer", "null"]}}, "required": ["n"]},
    # 26-30 $defs / $ref
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
     "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"]},
    {"definitions": {"c": {"enum": ["r", "g"]}}, "type": "array", "items": {"$ref": "#/definitions/c"}, "minItems": 1, "maxItems": 3},
    {"$defs": {"person": {"type": "object", "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["name"]}},
     "type": "object", "properties": {"people": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 2}}, "required": ["people"]},
    {"$defs": {"flag": {"type": "boolean"}}, "type": "object", "properties": {"on": {"$ref": "#/$defs/flag"}, "off": {"$ref": "#/$defs/flag"}}, "required": ["on"]},
    {"$defs": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"}}, "type": "object", "properties": {"ids": {"type": "array", "items": {"$ref": "#/$defs/id"}, "minItems": 1, "maxItems": 2}}, "required": ["ids"]},
    # 31-32 realistic extraction records
    {"type": "object", "properties": {
        "invoice_no": {"type": "string", "pattern": "^INV-[0-9]{3}$"},
        "currency": {"enum": ["EUR", "USD"]},
        "amount": {"type": "number", "minimum": 0, "maximum": 1000},
        "paid": {"type": "boolean"},
    }, "required": ["invoice_no", "currency", "amount", "paid"]},
    {"type": "object", "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "topics": {"type": "array", "items": {"enum": ["price", "service", "quality"]}, "minItems": 1, "maxItems": 3},
    }, "required": ["sentiment", "confidence", "topics"]},
]
