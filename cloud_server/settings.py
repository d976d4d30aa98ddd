"""The server's settings: one class, built at start-up from the environment (TANDEM_...) and the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from tandem.config import DEFAULT_TARGET, TargetPlacement, merge_keys, read_keys_file, split_keys


class ServerSettings(TargetPlacement):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    target: str = DEFAULT_TARGET
    model_name: str = Field(default="", description="the model id served on /v1/models; empty: `target`")
    host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535, description="0: any free port")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="0: any free port")
    threads: int = Field(default=2, ge=1, description="torch intra-op threads")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated; empty: open")
    api_keys_file: Path | None = Field(default=None, description="more keys, one a line ('#' comments); merged")
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate (chain): HTTPS and gRPC over TLS")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")

    max_sessions: int = Field(default=64, ge=1)
    session_ttl_s: float = Field(default=300.0, gt=0, description="idle sessions are evicted after this")
    max_session_memory_mb: float = Field(default=2048.0, gt=0, description="bound on the KV caches sessions may grow")
    max_prompt_tokens: int = Field(default=1536, ge=1)
    max_draft_tokens: int = Field(default=32, ge=0)
    max_tokens_limit: int = Field(default=1024, ge=1, description="the largest max_tokens a request may ask")
    max_concurrent_requests: int = Field(default=64, ge=1, description="requests running at once; more wait in "
                                         "the queue, or get 429 when it is full (or off)")
    max_requests_per_key: int = Field(default=32, ge=0, description="requests one API key (on an open server: one "
                                      "client address) may run at once; 0: no cap of its own")
    max_queue: int = Field(default=0, ge=0, description="requests that may wait for a slot, served round-robin "
                           "across keys; 0: none (429 at once)")
    max_queue_wait_s: float = Field(default=10.0, gt=0, description="longest wait in the queue; then 503")
    max_request_s: float = Field(default=600.0, ge=0, description="wall-time limit of a request (a completion, a "
                                 "session's open or verify); its work then stops, 504; 0: none")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    shutdown_grace_s: float = Field(default=10.0, ge=0, description="on SIGTERM: how long in-flight work may "
                                    "finish before it is cancelled")
    max_batch: int = Field(default=32, ge=1, description="verify blocks and completion steps per batched pass")
    batch_window_ms: float = Field(default=2.0, ge=0, description="longest wait for more work to batch; 0: none")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="the server's own log level (DEBUG: a line per load-aware advice)")
    trim_memory_s: float = Field(default=30.0, ge=0, description="seconds between returning freed heap memory to "
                                 "the system (glibc malloc_trim); 0: never")
    load_aware: bool = Field(default=True, description="advise each session's next block length from the load "
                             "(0: continue as a cloud-only stream); edges in mode auto follow it")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        return split_keys(v)

    @model_validator(mode="after")
    def _load_keys_and_check_tls(self) -> ServerSettings:
        if self.api_keys_file is not None:
            self.api_keys = merge_keys(self.api_keys, read_keys_file(self.api_keys_file))
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.target
