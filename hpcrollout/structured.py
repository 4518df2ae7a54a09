"""Structured outputs: the constraint of a run or of one row, and the check of each response against it.

A constraint is a mapping with exactly one of ``json`` (a JSON schema, as a mapping or a JSON string),
``regex``, ``choice`` (a list of strings) or ``grammar`` (an EBNF/Lark grammar, as vLLM takes it), plus
optionally vLLM's ``disable_any_whitespace``, ``disable_additional_properties`` and ``whitespace_pattern``.
The vLLM backend hands it to ``SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))``,
which constrains decoding; the response is checked afterwards anyway and flagged per sample in
``schema_valid`` (never dropped), because a response cut by ``max_tokens`` or a stop string is not valid even
under constrained decoding:
- ``json``: ``json.loads`` then the schema, with the ``jsonschema`` package when it is installed; without it only
  the top-level ``type``, ``required`` keys and ``enum`` are checked.
- ``regex``: Python's ``re.fullmatch`` (vLLM's regex dialect is close to Python's, not identical).
- ``choice``: the response equals one of the choices exactly.
- ``grammar``: not checked here (``schema_valid`` is null).

A per-row constraint (``data.structured_outputs_column``) is a JSON string or a mapping: a mapping of the
keys above is a constraint, any other mapping is taken as a JSON schema; a null cell means the run's
``sampling.structured_outputs`` (or none).
"""

from __future__ import annotations

import json
import re
from typing import Any

CONSTRAINT_KEYS = ("json", "regex", "choice", "grammar")
OPTION_KEYS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def parse_constraint(value: Any) -> dict[str, Any]:
    """A checked constraint (see the module docstring); ValueError says what is wrong with ``value``."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with one of {', '.join(CONSTRAINT_KEYS)}, got {value!r}")
    value = {k: v for k, v in value.items() if v is not None}  # a Parquet struct cell has every field, unset: null
    unknown = [k for k in value if k not in CONSTRAINT_KEYS + OPTION_KEYS]
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(str, unknown))}; a constraint has one of {', '.join(CONSTRAINT_KEYS)}"
        )
    kinds = [k for k in CONSTRAINT_KEYS if k in value]
    if len(kinds) != 1:
        raise ValueError(f"give exactly one of {', '.join(CONSTRAINT_KEYS)}, got {', '.join(kinds) or 'none'}")
    kind, spec = kinds[0], value[kinds[0]]
    if kind == "json":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as exc:
                raise ValueError(f"json: not a JSON schema ({exc})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"json: expected a JSON schema (a mapping), got {spec!r}")
        value["json"] = spec
    elif kind == "regex":
        if not isinstance(spec, str):
            raise ValueError(f"regex: expected a string, got {spec!r}")
        try:
            re.compile(spec)
        except re.error as exc:
            raise ValueError(f"regex: {spec!r} does not compile: {exc}") from None
    elif kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise ValueError(f"choice: expected a non-empty list of strings, got {spec!r}")
    elif not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"grammar: expected a grammar as a string, got {spec!r}")
    return value


def constraint_of_cell(cell: Any) -> dict[str, Any] | None:
    """The constraint in one cell of data.structured_outputs_column (None: the run's); ValueError if bad."""
    if cell is None:
        return None
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except ValueError as exc:
            raise ValueError(f'not JSON ({exc}); give a JSON schema or a mapping such as {{"regex": ...}}') from None
    if isinstance(cell, list) and cell and all(isinstance(kv, tuple) and len(kv) == 2 for kv in cell):
        cell = dict(cell)  # a Parquet map column
    if isinstance(cell, dict) and cell and all(k in CONSTRAINT_KEYS + OPTION_KEYS for k in cell):
        return parse_constraint(cell)
    return parse_constraint({"json": cell})


def is_valid(constraint: dict[str, Any] | None, text: str) -> bool | None:
    """Whether ``text`` satisfies the constraint; None where there is none, or it cannot be checked (grammar)."""
    if constraint is None:
        return None
    if "regex" in constraint:
        return re.fullmatch(constraint["regex"], text) is not None
    if "choice" in constraint:
        return text in constraint["choice"]
    if "json" in constraint:
        try:
            doc = json.loads(text)
        except ValueError:
            return False
        return _json_valid(doc, constraint["json"])
    return None


def _json_valid(doc: Any, schema: dict[str, Any]) -> bool:
    try:
        import jsonschema
    except ImportError:
        return _minimal_json_valid(doc, schema)
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError:
        return False
    except jsonschema.SchemaError:  # vLLM accepted a schema jsonschema does not: fall back to the basic check
        return _minimal_json_valid(doc, schema)
    return True


def _minimal_json_valid(doc: Any, schema: dict[str, Any]) -> bool:
    """Without jsonschema: the top-level type, the required keys of an object, and enum."""
    types = schema.get("type")
    if isinstance(types, str):
        types = [types]
    if types and not any(
        isinstance(doc, _JSON_TYPES.get(t, ())) and not (t in ("integer", "number") and isinstance(doc, bool))
        for t in types
    ):
        return False
    if isinstance(doc, dict) and any(key not in doc for key in schema.get("required", ())):
        return False
    return "enum" not in schema or doc in schema["enum"]
