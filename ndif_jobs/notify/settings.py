"""The notification settings, read from the environment (and the data folder's `.env`)."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class NotifySettings(BaseSettings):
    """`NDIF_JOBS_<FIELD>`: where notifications go, and when a quiet queue is worth one."""

    model_config = SettingsConfigDict(env_prefix="NDIF_JOBS_", extra="ignore", env_file_encoding="utf-8")

    notify: str = Field(default="", description="Notification URLs (apprise), separated by spaces or commas.")
    stall_s: float = Field(
        default=1800.0, gt=0, description="Jobs queued and none finished for this long: a stall notice."
    )
    unreachable_s: float = Field(
        default=900.0, gt=0, description="NDIF unreachable for this long: a notice."
    )
    notify_batch_s: float = Field(
        default=60.0, ge=0, description="At most one failed-jobs message per this many seconds."
    )
    notify_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest one notification may take to connect, and to answer."
    )

    @property
    def urls(self) -> list[str]:
        return [u for u in re.split(r"[\s,]+", self.notify.strip()) if u]

    @classmethod
    def load(cls, home: Path | None = None) -> NotifySettings:
        env_file = home / ".env" if home is not None else None
        return cls(_env_file=env_file) if env_file is not None and env_file.is_file() else cls()  # type: ignore[call-arg]  # `_env_file`: an init argument pydantic-settings' types leave out
