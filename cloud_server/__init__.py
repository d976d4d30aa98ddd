"""The cloud side, on the second floor: the target model behind gRPC and HTTP (OpenAI-compatible API and
verification sessions), health and metrics.

Contract: imports the core and the protocol, never the edge. One worker thread owns the model (`worker`), with the
session registry and admission (`registry`) and continuous batching (`batcher`); the servicer (`grpc_service`) and
the routes (`http_app`) convert, call the worker and convert back; `main` starts both in one process.
"""
