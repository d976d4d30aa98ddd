"""Settings for the in-process commands (demo, bench). Built at start-up from the environment and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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


# API keys, shared by the cloud's and the edge endpoint's settings
def split_keys(v: Any) -> Any:
    """A comma-separated string of keys as a list; anything else unchanged."""
    return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v


def read_keys_file(path: Path) -> list[str]:
    """One key a line; blank lines and lines starting with '#' are skipped. Read once, at start-up."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"cannot read the API keys file {str(path)!r}: {e.strerror or e}") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def merge_keys(*lists: list[str]) -> list[str]:
    return list(dict.fromkeys(k for keys in lists for k in keys))
