"""The cloud verifier: the target model behind HTTP (OpenAI-compatible + verification sessions) and gRPC."""
