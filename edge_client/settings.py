"""The edge's settings: one class, built at start-up from the environment (TANDEM_...) and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from tandem.config import DEFAULT_DRAFT, DraftPlacement, SpeculationSettings, merge_keys, read_keys_file, split_keys

Transport = Literal["grpc", "grpc-unary", "http"]


class EdgeSettings(SpeculationSettings, DraftPlacement):
    """The speculative loop's settings, plus how to reach the cloud and the edge's own endpoint."""

    transport: Transport = "grpc"
    draft: str = DEFAULT_DRAFT
    threads: int = Field(default=2, ge=1, description="torch intra-op threads for the draft")
    api_key: str | None = None
    tls: bool = Field(default=False, description="TLS to the cloud (also on with an https:// cloud or tls_ca_file)")
    tls_ca_file: Path | None = Field(default=None, description="PEM CA bundle the cloud's certificate must chain to; "
                                     "unset: the system's trusted CAs")
    timeout_s: float = Field(default=30.0, gt=0, description="deadline of each call to the cloud")

    # the edge's own OpenAI-compatible endpoint (`tandem edge serve`)
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535, description="0: any free port")
    model_name: str = Field(default="tandem", description="the model id served on the edge's /v1/models")
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # admission: the draft thread runs one request at a time; the others wait in a fair, bounded queue
    max_concurrent_requests: int = Field(default=1, ge=1, description="requests running at once on the endpoint")
    max_requests_per_key: int = Field(default=0, ge=0, description="requests one key (open: one address) may run "
                                      "at once; 0: no cap of its own")
    max_queue: int = Field(default=64, ge=0, description="requests that may wait for their turn, served "
                           "round-robin across keys; 0: none (429 at once)")
    max_queue_wait_s: float = Field(default=60.0, gt=0, description="longest wait in the queue; then 503")
    max_request_s: float = Field(default=600.0, ge=0, description="wall-time limit of a request; then its "
                                 "generation stops, 504; 0: none")
    shutdown_grace_s: float = Field(default=10.0, ge=0, description="on SIGTERM: how long in-flight requests may "
                                    "finish before they are cancelled")
    edge_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys the edge endpoint requires; empty: open")
    edge_api_keys_file: Path | None = Field(default=None, description="more keys, one a line ('#' comments); merged")
    edge_tls_cert_file: Path | None = Field(default=None, description="serve the endpoint over HTTPS: PEM certificate")
    edge_tls_key_file: Path | None = Field(default=None, description="PEM private key of edge_tls_cert_file")

    @field_validator("edge_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lstrip().startswith("["):
            return json.loads(v)  # the JSON list form this setting once took
        return split_keys(v)

    @model_validator(mode="after")
    def _load_keys_and_check_tls(self) -> EdgeSettings:
        if self.edge_api_keys_file is not None:
            self.edge_api_keys = merge_keys(self.edge_api_keys, read_keys_file(self.edge_api_keys_file))
        if (self.edge_tls_cert_file is None) != (self.edge_tls_key_file is None):
            raise ValueError("the edge endpoint's TLS needs both edge_tls_cert_file and edge_tls_key_file")
        return self

    @property
    def cloud_tls(self) -> bool:
        """TLS to the cloud: asked for, implied by an https:// address, or by a custom CA."""
        return self.tls or self.cloud.startswith("https://") or self.tls_ca_file is not None
