"""The OpenAPI schema both HTTP apps publish: FastAPI's, made to say exactly what the server accepts and answers.

FastAPI knows the pydantic models; the server knows more at start-up (its vocabulary, its context, its limits), answers
a bad request with 400 (never FastAPI's 422) and asks for a key only when it has keys. Rules across fields that JSON
Schema cannot state (q_ids holds len(tokens) * q_k values, the served model's name) stay with the server.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tandem.sampling import MIN_TEMPERATURE

_ERROR = {"description": "an error: {\"error\": {\"message\", \"type\", \"code\"}}",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@dataclass(frozen=True)
class Limits:
    """What the server enforces beyond its models, known once its model is loaded."""

    vocab_size: int
    context_length: int
    max_tokens: int  # the largest max_tokens a request may ask
    max_prompt_tokens: int | None = None  # None: the context alone bounds a prompt
    max_draft_tokens: int | None = None  # the cloud's verification sessions; None: no sessions (the edge)


def install_openapi(app: FastAPI, limits: Limits, secured: bool) -> None:
    """`app.openapi()` answers the truthful schema; `secured`: the server has API keys (and requires one)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = truthful(schema, limits, secured)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def truthful(schema: dict[str, Any], limits: Limits, secured: bool) -> dict[str, Any]:
    schema = copy.deepcopy(schema)
    for ops in schema["paths"].values():
        for method, op in ops.items():
            if method in _METHODS:
                _statuses(op, secured)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    if not secured:
        components.pop("securitySchemes", None)
    _exact(schemas)
    _bound_sessions(schemas, limits)
    _bound_openai(schemas, limits)
    _output_rules(schemas)
    _session_links(schema["paths"])
    return schema


def _session_links(paths: dict[str, Any]) -> None:
    """OpenAPI links: an opened session's id is what verify, continue and close take."""
    opened = paths.get("/v1/sessions", {}).get("post", {}).get("responses", {}).get("200")
    if opened is None:
        return
    links = {}
    for path, method in (("/v1/sessions/{session_id}/verify", "post"), ("/v1/sessions/{session_id}/continue", "post"),
                         ("/v1/sessions/{session_id}", "delete")):
        op = paths.get(path, {}).get(method)
        if op is not None and "operationId" in op:
            links[op["operationId"]] = {"operationId": op["operationId"],
                                        "parameters": {"session_id": "$response.body#/session_id"}}
    opened["links"] = links


def _exact(node: Any) -> None:
    """What pydantic writes loosely: a map with constrained keys (`patternProperties`) refuses any other key, and an
    integer's bounds are integers (2**63 as a float is no bound a validator reads exactly)."""
    if isinstance(node, dict):
        if "patternProperties" in node:
            node.setdefault("additionalProperties", False)
        if node.get("type") == "integer":
            for key in ("minimum", "maximum"):
                if isinstance(node.get(key), float):
                    node[key] = int(node[key])
            if isinstance(node.get("exclusiveMaximum"), float):
                node["maximum"] = int(node.pop("exclusiveMaximum")) - 1
            if isinstance(node.get("exclusiveMinimum"), float):
                node["minimum"] = int(node.pop("exclusiveMinimum")) + 1
        for value in node.values():
            _exact(value)
    elif isinstance(node, list):
        for value in node:
            _exact(value)


def _statuses(op: dict[str, Any], secured: bool) -> None:
    """400 for any input (FastAPI's 422 never comes), 413 for a body, 401 only where a key is required."""
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    if "requestBody" in op or op.get("parameters"):
        responses.setdefault("400", copy.deepcopy(_ERROR))
    if "requestBody" in op:
        responses.setdefault("413", copy.deepcopy(_ERROR))
    if not secured:
        op.pop("security", None)
        responses.pop("401", None)
    elif op.get("security"):
        responses.setdefault("401", copy.deepcopy(_ERROR))


def _prop(schemas: dict[str, Any], model: str, field: str) -> dict[str, Any] | None:
    """The schema of `model.field` (of its non-null branch), or None when the app has no such model."""
    prop: dict[str, Any] | None = schemas.get(model, {}).get("properties", {}).get(field)
    if prop is not None and "anyOf" in prop:
        branches = [b for b in prop["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1:
            return branches[0]
    return prop


def _token_ids(prop: dict[str, Any] | None, limits: Limits, max_items: int | None = None) -> None:
    if prop is None:
        return
    prop["items"] = {"type": "integer", "minimum": 0, "maximum": limits.vocab_size - 1}
    if max_items is not None:
        prop["maxItems"] = max_items


def _at_most(schemas: dict[str, Any], model: str, field: str, maximum: int) -> bool:
    """Bound `model.field`; a default above the bound is refused, so then the field is required. True: required."""
    prop = _prop(schemas, model, field)
    if prop is None:
        return False
    prop["maximum"] = maximum
    outer = schemas[model]["properties"][field]
    if isinstance(outer.get("default"), int) and outer["default"] > maximum:
        del outer["default"]
        schemas[model].setdefault("required", []).append(field)
        return True
    return False


def _prompt_max(limits: Limits, extra: int = 0) -> int:
    """The longest prompt: the server's limit (+ `extra`), and one position left in the context."""
    fits = limits.context_length - 1
    return fits if limits.max_prompt_tokens is None else min(limits.max_prompt_tokens + extra, fits)


def _temperature(prop: dict[str, Any]) -> dict[str, Any]:
    """0 (greedy), or at least the core's smallest temperature."""
    sampled = {"type": "number", "minimum": MIN_TEMPERATURE}
    if "maximum" in prop:
        sampled["maximum"] = prop["maximum"]
    return {"anyOf": [{"type": "number", "const": 0}, sampled]}


def _below(n: int) -> str:
    """A regex of the decimal integers in [0, n), leading zeros allowed; n >= 1."""
    m = str(n - 1)
    parts = ["0", m] + [f"[1-9][0-9]{{0,{len(m) - 2}}}"] * (len(m) > 1)
    for i, d in enumerate(m):
        low = 1 if i == 0 else 0
        if int(d) > low:
            parts.append(f"{m[:i]}[{low}-{int(d) - 1}][0-9]{{{len(m) - i - 1}}}")
    return f"^0*(?:{'|'.join(parts)})$"


def _logit_bias(prop: dict[str, Any] | None, limits: Limits) -> None:
    """Keys: token ids (decimal strings) in the vocabulary."""
    if prop is not None:
        prop["propertyNames"] = {"pattern": _below(limits.vocab_size), "maxLength": 9}


def _bound_sessions(schemas: dict[str, Any], limits: Limits) -> None:
    if "OpenBody" not in schemas:
        return
    opened = schemas["OpenBody"]
    _token_ids(_prop(schemas, "OpenBody", "prompt"), limits, _prompt_max(limits))
    # a resumed session (session_id set) may carry its output so far: max_tokens more
    resumed = {"properties": {"session_id": {"type": "string"}}, "required": ["session_id"]}
    opened["if"] = resumed
    opened["then"] = {"properties": {"prompt": {"maxItems": _prompt_max(limits, limits.max_tokens)}}}
    opened["else"] = {"properties": {"prompt": {"maxItems": _prompt_max(limits)}}}
    opened["properties"]["prompt"].pop("maxItems", None)
    sampling = schemas["SamplingBody"]["properties"]
    sampling["max_tokens"]["minimum"] = 1
    if _at_most(schemas, "SamplingBody", "max_tokens", limits.max_tokens):  # the default sampling is refused too
        opened["required"].append("sampling")
        opened["properties"]["sampling"].pop("default", None)
    sampling["temperature"] = _temperature(sampling["temperature"])
    sampling["top_k"] |= {"minimum": 0}
    sampling["top_p"] |= {"exclusiveMinimum": 0, "maximum": 1}
    _token_ids(_prop(schemas, "ContinueBody", "prompt"), limits, limits.context_length)
    _token_ids(_prop(schemas, "DraftBody", "tokens"), limits, limits.max_draft_tokens)
    _token_ids(_prop(schemas, "CandidateBody", "tokens"), limits, limits.max_draft_tokens)


def _null_or_absent(*fields: str) -> dict[str, Any]:
    return {"properties": {f: {"type": "null"} for f in fields}}


def _set(field: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def _output_rules(schemas: dict[str, Any]) -> None:
    """The rules across fields of the OpenAI requests (see params.py), as JSON Schema."""
    if "ResponseFormat" in schemas:  # `json_schema` comes with type json_schema, and only with it
        schemas["ResponseFormat"] |= {"if": {"properties": {"type": {"const": "json_schema"}}},
                                      "then": _set("json_schema"), "else": _null_or_absent("json_schema")}
    constraints = ("json", "regex", "grammar", "choice")
    if "StructuredOutputs" in schemas:  # at most one of its constraints
        pairs = [{"allOf": [_set(a), _set(b)]} for a, b in itertools.combinations(constraints, 2)]
        schemas["StructuredOutputs"].setdefault("allOf", []).append({"not": {"anyOf": pairs}})
    grammar_format = {"required": ["response_format"],
                      "properties": {"response_format": {"properties": {"type": {"enum": ["json_object",
                                                                                          "json_schema"]}}}}}
    structured = {"required": ["structured_outputs"],
                  "properties": {"structured_outputs": {"anyOf": [_set(c) for c in constraints]}}}
    for model in ("CompletionRequest", "ChatRequest"):  # not a JSON response_format and a constraint both
        if model in schemas and "structured_outputs" in schemas[model].get("properties", {}):
            schemas[model].setdefault("allOf", []).append({"not": {"allOf": [grammar_format, structured]}})
    if "top_logprobs" in schemas.get("ChatRequest", {}).get("properties", {}):  # top_logprobs needs logprobs: true
        logprobs = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
        schemas["ChatRequest"].setdefault("allOf", []).append({"if": _set("top_logprobs"), "then": logprobs})


def _bound_openai(schemas: dict[str, Any], limits: Limits) -> None:
    prompt = _prop(schemas, "CompletionRequest", "prompt")
    for branch in (prompt or {}).get("anyOf", []):
        items = branch.get("items", {})
        if items.get("type") == "integer":
            _token_ids(branch, limits, _prompt_max(limits))
        elif items.get("type") == "array":
            _token_ids(items, limits, _prompt_max(limits))
    for model in ("CompletionRequest", "ChatRequest", "SamplingBody"):
        _logit_bias(_prop(schemas, model, "logit_bias"), limits)
        temperature = _prop(schemas, model, "temperature")
        if temperature is not None and model != "SamplingBody":
            schemas[model]["properties"]["temperature"] = {"anyOf": [_temperature(temperature), {"type": "null"}]}
    for model, field in (("CompletionRequest", "max_tokens"), ("ChatRequest", "max_tokens"),
                         ("ChatRequest", "max_completion_tokens")):
        _at_most(schemas, model, field, limits.max_tokens)
