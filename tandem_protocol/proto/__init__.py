"""Generated stubs of protos/tandem/v1/verifier.proto (regenerate with `python scripts/gen_protos.py`)."""
