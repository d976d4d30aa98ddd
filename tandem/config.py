"""Settings for the in-process commands (demo, bench). Built at start-up from the environment and the CLI."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    target: str = "demo-target"
    draft: str = "demo-draft"
    threads: int = Field(default=2, ge=1, description="torch intra-op threads for this process")
    gamma: int | Literal["adaptive"] = Field(default=4, description="draft block length, or 'adaptive' (edge path)")

    @field_validator("gamma", mode="before")
    @classmethod
    def _gamma(cls, v: object) -> object:
        return int(v) if isinstance(v, str) and v != "adaptive" else v

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 64:
            raise ValueError("gamma must be in [1, 64] or 'adaptive'")
        return v
