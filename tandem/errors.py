"""Typed errors. Transports map each `code` to a status (HTTP and gRPC); nothing here knows about either."""

from __future__ import annotations


class TandemError(Exception):
    code = "internal_error"


class InvalidRequestError(TandemError, ValueError):
    """Malformed input: bad sampling parameters, empty prompt, out-of-vocabulary ids, ..."""

    code = "invalid_request"


class ContextOverflowError(InvalidRequestError):
    code = "context_length_exceeded"


class TokenizerMismatchError(TandemError):
    code = "tokenizer_mismatch"

    def __init__(self, draft_name: str, draft_fp: str, target_name: str, target_fp: str) -> None:
        super().__init__(
            f"draft and target tokenizers differ: draft {draft_name!r} has fingerprint {draft_fp}, "
            f"target {target_name!r} has fingerprint {target_fp}; speculative decoding needs one shared vocabulary"
        )
        self.draft_fp = draft_fp
        self.target_fp = target_fp


class ModelLoadError(TandemError):
    code = "model_load_error"


class CacheRollbackError(TandemError):
    """The KV cache did not shrink to the requested length (a cache kind that cannot crop)."""

    code = "cache_rollback_error"


class SessionNotFoundError(TandemError):
    code = "session_not_found"


class SessionConflictError(TandemError):
    """A well-formed request the session's state refuses: it has finished, is busy, expects another seq, or has
    committed another context."""

    code = "session_conflict"


class CapacityError(TandemError):
    code = "over_capacity"


class RemoteError(TandemError):
    """A failure reported by (or on the way to) a remote verifier: its error code and the transport's status."""

    def __init__(self, code: str, message: str, status: str | int) -> None:
        super().__init__(f"{message} ({status})")
        self.code = code
        self.status = status
