"""The OpenAI-compatible HTTP API both servers speak: schemas, responses, text, the error contract."""
