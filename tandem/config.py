"""Settings for the in-process commands (demo, bench). Built at start-up from the environment and the CLI."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    target: str = "demo-target"
    draft: str = "demo-draft"
    threads: int = Field(default=2, ge=1, description="torch intra-op threads for this process")
    gamma: int = Field(default=4, ge=1, le=64)
