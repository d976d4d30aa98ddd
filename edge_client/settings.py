"""The edge's settings: one class, built at start-up from the environment (TANDEM_...) and the command line."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tandem.config import Gamma

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
    timeout_s: float = Field(default=30.0, gt=0, description="deadline of each call to the cloud")
    retries: int = Field(default=5, ge=0, description="reconnect attempts after a lost cloud, per loss")
    backoff_s: float = Field(default=0.2, gt=0, description="first reconnect delay; doubles each attempt")
    backoff_max_s: float = Field(default=5.0, gt=0)
    auto_probe_rounds: int = Field(default=3, ge=1, description="auto mode: speculative rounds measured first")
    auto_margin: float = Field(default=1.1, ge=1.0, description="auto: speculate only when its rate beats cloud x this")
    client_id: str = "tandem-edge"

    # the edge's own OpenAI-compatible endpoint (`tandem edge serve`)
    host: str = "127.0.0.1"
    port: int = Field(default=8001, ge=0, le=65535, description="0: any free port")
    model_name: str = Field(default="tandem", description="the model id served on the edge's /v1/models")
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    edge_api_keys: list[str] = Field(default_factory=list, description="keys the edge endpoint requires; empty: open")
