"""Grammars for structured output: JSON objects, JSON schemas and tool calls, as GBNF for llama.cpp's grammar sampler.

The HTTP layer turns `response_format` and `tools`/`tool_choice` into a GBNF string with these functions and puts it
in the request's `params["grammar"]` (docs/structured-output.md). Schemas go through llama-cpp-python's converter,
which silently ignores much of JSON Schema (number bounds, `oneOf` exclusivity, `allOf` constraints, unknown formats,
`required` names without a property, keywords beside `$ref` or a type list): a grammar built from such a schema lets
the model write JSON that does not validate. So every schema is checked first and anything the grammar cannot
guarantee is refused with a GrammarError naming the part, as a JSON pointer. Local `$ref`s are inlined here (the
converter names rules after a ref's last segment and can alias a `$defs` entry to an unrelated rule of that name).
"""

from __future__ import annotations

import json
import re

from llama_cpp.llama_grammar import json_schema_to_gbnf

# keywords that say nothing about which JSON is valid
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly"})
HANDLED = frozenset({"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
                     "maxItems", "enum", "const", "anyOf", "allOf", "$ref", "$defs", "definitions", "pattern",
                     "minLength", "maxLength", "format"})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
MAX_DEPTH = 32
# the converter spells a count out as that many copies of a rule: minItems 10**9 would take the worker's memory
MAX_COUNT = 1000
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
_SHAPES = {"type": (str, list), "properties": dict, "required": list, "additionalProperties": (bool, dict),
           "items": (dict, list, bool), "prefixItems": list, "enum": list, "anyOf": list, "allOf": list,
           "$ref": str, "pattern": str, "format": str}
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_STRING_KEYS = frozenset({"pattern", "minLength", "maxLength", "format"})
_OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties"})
_ARRAY_KEYS = frozenset({"items", "prefixItems", "minItems", "maxItems"})
_OTHER_TYPES_KEYS = {t: (_STRING_KEYS | _OBJECT_KEYS | _ARRAY_KEYS) - own for t, own in (
    ("string", _STRING_KEYS), ("object", _OBJECT_KEYS), ("array", _ARRAY_KEYS), ("number", frozenset()),
    ("integer", frozenset()), ("boolean", frozenset()), ("null", frozenset()))}
TOOL_MARKER = "<tool_call>"  # with tool_choice "auto", a reply that calls tools starts with this, then the calls


class GrammarError(ValueError):
    """A schema (or tool) the grammar cannot express; `path` is a JSON pointer to the part."""

    def __init__(self, message: str, path: str = "#"):
        super().__init__(f"{message} (at {path})")
        self.message = message
        self.path = path


def grammar_for_json_object() -> str:
    """Any JSON object (response_format {"type": "json_object"}), with single spaces only, so it cannot run away."""
    return _to_gbnf({"type": "object"})


def grammar_for_schema(schema: dict) -> str:
    """GBNF whose every complete output is JSON valid against `schema`; GrammarError for what it cannot guarantee."""
    return _to_gbnf(normalize_schema(schema))


def normalize_schema(schema: dict) -> dict:
    """The schema with local $refs inlined and type lists spelled as anyOf, checked keyword by keyword."""
    if not isinstance(schema, dict):
        raise GrammarError("a schema must be a JSON object")
    return _Normalizer(schema).visit(schema, "#", 0, ())


def grammar_for_tools(tools: list[dict], choice: str | dict = "required", parallel: bool = False,
                      max_calls: int = 8) -> str:
    """A grammar for a tool call envelope {"name": ..., "arguments": {...}} (a list of 1..max_calls when `parallel`;
    the bound keeps a small model from listing calls until max_tokens).

    `choice` is "required" (any of the tools), a function name (or OpenAI's {"type": "function", "function":
    {"name": ...}}), or "auto": then the reply is either plain text or TOOL_MARKER followed by the envelope."""
    if isinstance(choice, dict):
        choice = (choice.get("function") or {}).get("name") or ""
    functions = [_function_of(tool, i) for i, tool in enumerate(tools or [])]
    if not functions:
        raise GrammarError("tools must name at least one function", "#/tools")
    if choice not in ("required", "auto"):
        functions = [f for f in functions if f["name"] == choice]
        if not functions:
            raise GrammarError(f"tool_choice names {choice!r}, which is not among the tools", "#/tool_choice")
    calls = [_call_schema(f, i) for i, f in enumerate(functions)]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    envelope = {"type": "array", "items": call, "minItems": 1, "maxItems": max_calls} if parallel else call
    gbnf = _to_gbnf(envelope)
    if choice != "auto":
        return gbnf
    # "auto": either the marker and the calls, or text that does not start with the marker
    gbnf = gbnf.replace("root ::=", "tool-calls ::=", 1)
    not_marker = " | ".join(_gbnf_literal(TOOL_MARKER[:i]) + f" [^{_gbnf_class_char(TOOL_MARKER[i])}] any-char*"
                            for i in range(len(TOOL_MARKER)))
    prefixes = " | ".join(_gbnf_literal(TOOL_MARKER[:i]) for i in range(1, len(TOOL_MARKER)))
    return (f"root ::= {_gbnf_literal(TOOL_MARKER)} space tool-calls | plain-text\n"
            f"plain-text ::= ({not_marker} | {prefixes})?\n"
            "any-char ::= [^\\x00]\n" + gbnf)


def parse_tool_calls(text: str, choice: str | dict = "required") -> list[dict] | None:
    """The calls in a reply generated with grammar_for_tools: [{"name", "arguments"}, ...], None for plain text."""
    if choice == "auto":
        if not text.startswith(TOOL_MARKER):
            return None
        text = text[len(TOOL_MARKER):]
    value = json.loads(text)
    return value if isinstance(value, list) else [value]


def _function_of(tool: dict, i: int) -> dict:
    path = f"#/tools/{i}"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise GrammarError("a tool must be {\"type\": \"function\", \"function\": {...}}", path)
    function = tool["function"]
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise GrammarError("a function needs a name", f"{path}/function/name")
    return function


def _call_schema(function: dict, i: int) -> dict:
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    try:
        arguments = normalize_schema(parameters)
    except GrammarError as e:
        raise GrammarError(e.message, f"#/tools/{i}/function/parameters{e.path[1:]}") from None
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}


def _to_gbnf(schema: dict, path: str = "#") -> str:
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as e:
        raise GrammarError(f"the schema cannot be turned into a grammar: {e}", path) from None
    # the converter lets a string hold raw control characters, which JSON forbids (json.loads refuses them)
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)


_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _unsayable(value) -> bool:
    """A value whose JSON text needs an escape llama.cpp's GBNF parser does not know (\\b, \\f)."""
    if isinstance(value, str):
        return "\b" in value or "\f" in value
    if isinstance(value, list):
        return any(_unsayable(v) for v in value)
    if isinstance(value, dict):
        return any(_unsayable(k) or _unsayable(v) for k, v in value.items())
    return False


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)


def _gbnf_class_char(c: str) -> str:
    return "\\" + c if c in "]\\^-" else c


class _Normalizer:
    def __init__(self, root: dict):
        self.root = root

    def visit(self, schema, path: str, depth: int, refs: tuple[str, ...]) -> dict:
        if depth > MAX_DEPTH:
            raise GrammarError(f"the schema nests deeper than {MAX_DEPTH} levels", path)
        if schema is True or schema == {}:
            return {}
        if not isinstance(schema, dict):
            raise GrammarError("a subschema must be a JSON object (boolean schemas are not supported here)", path)
        for key in schema:
            if key not in HANDLED and key not in ANNOTATIONS:
                raise GrammarError(f"'{key}' is not supported: the output could not be guaranteed to satisfy it",
                                   f"{path}/{key}")
        out = {k: v for k, v in schema.items() if k in HANDLED and k not in ("$defs", "definitions")}
        for key, kinds in _SHAPES.items():
            if key in out and not isinstance(out[key], kinds):
                raise GrammarError(f"'{key}' has the wrong kind of value", f"{path}/{key}")
        if isinstance(out.get("type"), list) and not all(isinstance(t, str) for t in out["type"]):
            raise GrammarError("'type' must name types", f"{path}/type")
        for key in _COUNTS:
            if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int)
                               or not 0 <= out[key] <= MAX_COUNT):
                raise GrammarError(f"'{key}' must be a whole number from 0 to {MAX_COUNT}", f"{path}/{key}")
        constraining = set(out)
        if "$ref" in out:
            if constraining - {"$ref"}:
                raise GrammarError("keywords beside '$ref' are not supported", path)
            return self._ref(out["$ref"], path, depth, refs)
        if "allOf" in out:
            parts = out.pop("allOf")
            if not isinstance(parts, list) or len(parts) != 1 or constraining - {"allOf"}:
                raise GrammarError("'allOf' is supported only with one subschema and nothing beside it",
                                   f"{path}/allOf")
            return self.visit(parts[0], f"{path}/allOf/0", depth + 1, refs)
        if "anyOf" in out:
            if constraining - {"anyOf"}:
                raise GrammarError("keywords beside 'anyOf' are not supported", path)
            if not isinstance(out["anyOf"], list) or not out["anyOf"]:
                raise GrammarError("'anyOf' must be a non-empty list", f"{path}/anyOf")
            return {"anyOf": [self.visit(s, f"{path}/anyOf/{i}", depth + 1, refs) for i, s in enumerate(out["anyOf"])]}
        kind = out.get("type")
        if isinstance(kind, list):
            if not kind:
                raise GrammarError("'type' must not be an empty list", f"{path}/type")
            # each type keeps the keywords that apply to it (maxLength says nothing about null)
            return {"anyOf": [self.visit({k: v for k, v in schema.items() if k not in _OTHER_TYPES_KEYS.get(t, ())}
                                         | {"type": t}, path, depth + 1, refs) for t in kind]}
        if kind is not None and kind not in TYPES:
            raise GrammarError(f"unknown type {kind!r}", f"{path}/type")
        if "enum" in out or "const" in out:
            if "enum" in out and (not isinstance(out["enum"], list) or not out["enum"]):
                raise GrammarError("'enum' must be a non-empty list", f"{path}/enum")
            for key in ("enum", "const"):
                if key in out and _unsayable(out[key]):
                    # the converter writes the value's JSON into a GBNF literal, whose parser knows no \b or \f
                    raise GrammarError(f"'{key}' holds a backspace or form feed character, which the grammar "
                                       "cannot express", f"{path}/{key}")
            return {k: out[k] for k in ("enum", "const") if k in out}
        self._string(out, path)
        if "properties" in out or "additionalProperties" in out or "required" in out or kind == "object":
            return self._object(out, path, depth, refs)
        if "items" in out or "prefixItems" in out or kind == "array":
            return self._array(out, path, depth, refs)
        return out

    def _ref(self, ref, path: str, depth: int, refs: tuple[str, ...]) -> dict:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise GrammarError(f"only local references ('#/...') are supported, not {ref!r}", f"{path}/$ref")
        if ref in refs:
            raise GrammarError(f"recursive reference {ref!r} is not supported", f"{path}/$ref")
        target = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise GrammarError(f"reference {ref!r} points to nothing", f"{path}/$ref")
            target = target[part]
        return self.visit(target, ref, depth + 1, (*refs, ref))

    def _string(self, out: dict, path: str) -> None:
        string_keys = {"pattern", "minLength", "maxLength", "format"} & set(out)
        if not string_keys:
            return
        if out.get("type", "string") != "string":
            raise GrammarError(f"{sorted(string_keys)} apply to strings only", path)
        out["type"] = "string"
        if "pattern" in out:
            if not isinstance(out["pattern"], str) or any(
                    int(n) > MAX_COUNT for m in _QUANTIFIER.finditer(out["pattern"]) for n in m.groups() if n):
                raise GrammarError(f"a pattern must be a string whose counts are at most {MAX_COUNT}",
                                   f"{path}/pattern")
            _to_gbnf({"type": "string", "pattern": out["pattern"]}, f"{path}/pattern")
        if "format" in out and out["format"] not in FORMATS:
            raise GrammarError(f"format {out['format']!r} is not supported (supported: {sorted(FORMATS)})",
                               f"{path}/format")
        if len(string_keys & {"pattern", "format"}) + bool(string_keys & {"minLength", "maxLength"}) > 1:
            raise GrammarError("only one of 'pattern', 'format' and a length bound can apply to one string", path)

    def _object(self, out: dict, path: str, depth: int, refs: tuple[str, ...]) -> dict:
        if out.get("type", "object") != "object":
            raise GrammarError("object keywords on a non-object type", path)
        props = out.get("properties", {})
        if not isinstance(props, dict):
            raise GrammarError("'properties' must be an object", f"{path}/properties")
        required = out.get("required", [])
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            raise GrammarError("'required' must be a list of names", f"{path}/required")
        missing = [name for name in required if name not in props]
        if missing:
            raise GrammarError(f"required {missing} have no entry in 'properties'", f"{path}/required")
        result = {"type": "object", "required": list(required),
                  "properties": {name: self.visit(s, f"{path}/properties/{name}", depth + 1, refs)
                                 for name, s in props.items()}}
        extra = out.get("additionalProperties", False if props else True)
        if isinstance(extra, dict) and extra:
            extra = self.visit(extra, f"{path}/additionalProperties", depth + 1, refs)
        result["additionalProperties"] = extra if extra != {} else True
        return result

    def _array(self, out: dict, path: str, depth: int, refs: tuple[str, ...]) -> dict:
        if out.get("type", "array") != "array":
            raise GrammarError("array keywords on a non-array type", path)
        items, prefix = out.get("items"), out.get("prefixItems")
        if prefix is not None or isinstance(items, list):
            if prefix is not None and items is not None:
                raise GrammarError("'prefixItems' with 'items' is not supported", path)
            if {"minItems", "maxItems"} & set(out):
                raise GrammarError("item counts on a tuple are not supported", path)
            tuple_items = prefix if prefix is not None else items
            return {"type": "array", "prefixItems": [self.visit(s, f"{path}/prefixItems/{i}", depth + 1, refs)
                                                     for i, s in enumerate(tuple_items)]}
        result = {k: out[k] for k in ("minItems", "maxItems") if k in out}
        result["type"] = "array"
        result["items"] = self.visit(items if items is not None else {}, f"{path}/items", depth + 1, refs)
        return result
