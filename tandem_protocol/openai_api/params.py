"""From an OpenAI request to the core's sampling parameters: every field the request models declare is mapped here
(`n` choices get one set each), and a structured-output request becomes a grammar."""

from __future__ import annotations

import dataclasses
import json

from tandem.errors import InvalidRequestError
from tandem.grammar import Grammar, GrammarKind
from tandem.sampling import SamplingParams
from tandem_protocol.openai_api.schemas import ChatRequest, CompletionRequest, ResponseFormat, StructuredOutputs


def response_format_grammar(rf: ResponseFormat) -> Grammar | None:
    if rf.type == "json_object":
        return Grammar("json_object")
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise InvalidRequestError("response_format: type json_schema needs `json_schema`")
        return Grammar("json_schema", json.dumps(rf.json_schema.schema_))
    if rf.json_schema is not None:
        raise InvalidRequestError(f"response_format: `json_schema` goes with type json_schema, not {rf.type}")
    return None


def constraint(rf: ResponseFormat | None, so: StructuredOutputs | None) -> Grammar | None:
    """`response_format` (OpenAI) or `structured_outputs` (vLLM's extension): at most one constraint."""
    found: list[Grammar] = []
    g = None if rf is None else response_format_grammar(rf)
    if g is not None:
        found.append(g)
    if so is not None:
        given: list[tuple[GrammarKind, str | None]] = [
            ("json_schema", None if so.json_ is None else json.dumps(so.json_)), ("regex", so.regex),
            ("lark", so.grammar), ("choice", None if so.choice is None else json.dumps(so.choice))]
        mine = [Grammar(kind, spec) for kind, spec in given if spec is not None]
        if len(mine) > 1:
            raise InvalidRequestError("structured_outputs takes one of json, regex, grammar, choice")
        found += mine
    if len(found) > 1:
        raise InvalidRequestError("give one output constraint: response_format or structured_outputs, not both")
    return found[0] if found else None


def logprobs_of(body: CompletionRequest | ChatRequest) -> int | None:
    """How many alternatives per token (0: the chosen token's own only); None: no logprobs."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true")
    return (body.top_logprobs or 0) if body.logprobs else None


def sampling_params(body: CompletionRequest | ChatRequest, max_tokens: int | None, prompt_len: int,
                    context_length: int, max_tokens_limit: int) -> list[SamplingParams]:
    """One set per choice (`n`): with a seed, choice i draws from seed + i; without one, each from fresh entropy."""
    if max_tokens is None:
        max_tokens = max(1, min(max_tokens_limit, context_length - prompt_len))
    bias = tuple(sorted((int(t), b) for t, b in (body.logit_bias or {}).items()))
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
        ignore_eos=body.ignore_eos, min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=bias, grammar=constraint(body.response_format, body.structured_outputs), logprobs=logprobs_of(body),
    )
    if body.seed is None:
        return [params] * body.n
    return [dataclasses.replace(params, seed=(body.seed + i) % 2**63) for i in range(body.n)]
