"""Settings for the in-process commands (demo, bench). Built at start-up from the environment and the CLI."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _parse_gamma(v: object) -> object:
    return int(v) if isinstance(v, str) and v != "adaptive" else v


def _check_gamma(v: int | str) -> int | str:
    if isinstance(v, int) and not 0 <= v <= 64:
        raise ValueError("gamma must be in [0, 64] or 'adaptive'")
    return v


# a draft block length, or "adaptive"; from the CLI and the environment alike (TANDEM_GAMMA=4 or =adaptive)
Gamma = Annotated[int | Literal["adaptive"], BeforeValidator(_parse_gamma), AfterValidator(_check_gamma)]


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    target: str = "demo-target"
    draft: str = "demo-draft"
    threads: int = Field(default=2, ge=1, description="torch intra-op threads for this process")
    gamma: Gamma = Field(default=4, description="draft block length, or 'adaptive' (edge path)")
