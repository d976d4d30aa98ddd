"""The protocol, the house's first floor: everything that crosses the wire, as the core's types both ways.

Contract: imports only the core. Both sides use it and neither re-implements any of it.
- `proto/`: the generated stubs of protos/tandem/v1/verifier.proto; `pb`: protobuf <-> core conversions, both
  directions; `flat`: the flat forms of q and candidates shared by protobuf and JSON.
- `bodies`: the verification session as JSON (request and response bodies) and their conversions, both directions.
- `errors`: error codes both ways (code -> HTTP status, gRPC status, JSON body; gRPC status -> code), the errors only
  servers raise, the bearer-key check.
- `openai_api/`: the OpenAI-compatible API both servers speak (schemas, responses and SSE, incremental text, the HTTP
  error contract); `metrics`: the Prometheus metrics both servers publish (vLLM's names under `tandem_`).

Adding a field to the wire: the .proto (then `python scripts/gen_protos.py`), `pb` and `bodies` here, and the code
that uses the field.
"""
