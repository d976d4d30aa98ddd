"""The edge's settings: one class, built at start-up from the environment (TANDEM_...) and the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tandem.config import Gamma, merge_keys, read_keys_file, split_keys

Mode = Literal["spec", "cloud", "edge", "auto"]
Transport = Literal["grpc", "grpc-unary", "http"]


class EdgeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    cloud: str = Field(default="127.0.0.1:50051", description="HOST:PORT of the cloud (gRPC or HTTP per transport)")
    transport: Transport = "grpc"
    mode: Mode = "spec"
    draft: str = "demo-draft"
    threads: int = Field(default=2, ge=1, description="torch intra-op threads for the draft")
    gamma: Gamma = Field(default="adaptive", description="draft block length, or adaptive")
    max_gamma: int = Field(default=12, ge=1, description="the largest block adaptive gamma may choose")
    pipeline: bool = Field(default=True, description="draft the next block while the current one is verified")
    q_top_k: int = Field(default=16, ge=1, description="sampling: the draft samples from its top-k and sends them")
    fallback: Literal["none", "edge"] = "none"
    api_key: str | None = None
    tls: bool = Field(default=False, description="TLS to the cloud (also on with an https:// cloud or tls_ca_file)")
    tls_ca_file: Path | None = Field(default=None, description="PEM CA bundle the cloud's certificate must chain to; "
                                     "unset: the system's trusted CAs")
    timeout_s: float = Field(default=30.0, gt=0, description="deadline of each call to the cloud")
    retries: int = Field(default=5, ge=0, description="reconnect attempts after a lost cloud, per loss")
    backoff_s: float = Field(default=0.2, gt=0, description="first reconnect delay; doubles each attempt")
    backoff_max_s: float = Field(default=5.0, gt=0)
    auto_probe_rounds: int = Field(default=3, ge=1, description="auto mode: speculative rounds measured first")
    auto_margin: float = Field(default=1.1, ge=1.0, description="auto: speculate only when its rate beats cloud x this")
    client_id: str = "tandem-edge"
    # Ouroboros-style drafting: blocks lengthened from a phrase pool kept per client id (a warm start), candidate
    # continuations verified in the same target pass (greedy only), the cloud's feedback learnt into the pool
    ouroboros: bool = Field(default=False, description="lengthen drafts from a phrase pool, with candidates")
    ouroboros_extend: int = Field(default=8, ge=0, description="pool tokens appended to a drafted block, at most")
    ouroboros_candidates: int = Field(default=1, ge=0, description="candidate continuations per block (greedy)")
    ouroboros_candidate_len: int = Field(default=4, ge=1)
    pool_max_clients: int = Field(default=64, ge=1, description="phrase pools kept (one per client id), LRU")
    pool_max_tokens: int = Field(default=2_000_000, ge=1, description="tokens all phrase pools hold together")

    # the edge's own OpenAI-compatible endpoint (`tandem edge serve`)
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535, description="0: any free port")
    model_name: str = Field(default="tandem", description="the model id served on the edge's /v1/models")
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
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
