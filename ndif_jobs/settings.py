"""Every knob ndif-jobs has, read from the environment and a `.env` file (see `.env.example`).

One `Settings` object is built per process (`get_settings()`); tests build their own with
`Settings(home=tmp_path)`. The NDIF API key is a `SecretStr` so that printing, logging or
dumping the settings never shows it.

The `.env` file is read from the data folder (`<home>/.env`) or from the file named with
`--env-file`, never from the folder a command runs in: a cloned repository's `.env` must not
configure ndif-jobs. Even a trusted `.env` cannot set what runs code or where the API key is sent
(`ENV_ONLY`): those come from the environment or the command line alone.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .read_settings import ENV_ONLY, ensure_private_dir

__all__ = ["ENV_ONLY", "Settings", "ensure_private_dir", "get_settings", "reset_settings_cache"]

_HOW_TO_SET = "set them in the environment (NDIF_HOST=... ndif-jobs ...) or name modules with --import"
_warned: set[str] = set()


def _default_home() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("ndif-jobs", appauthor=False))


class Settings(BaseSettings):
    """ndif-jobs configuration. Environment variables are `NDIF_JOBS_<FIELD>` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix="NDIF_JOBS_",
        env_file=None,  # chosen in settings_customise_sources: the data folder's, or an explicit one
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    home: Path = Field(default_factory=_default_home, description="Data folder: database, results, model cache.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the queue; default: a SQLite file in the data folder."
    )

    # NDIF's own variable names, so one environment serves nnsight and ndif-jobs alike.
    ndif_host: str = Field(
        default="https://api.ndif.us",
        validation_alias=AliasChoices("NDIF_HOST", "ndif_host"),
        description="NDIF API address.",
    )
    ndif_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("NDIF_API_KEY", "ndif_api_key"),
        description="NDIF API key. Never logged or stored.",
    )

    default_backend: Literal["local", "ndif"] = Field(default="local", description="Backend for new jobs.")
    default_model: str = Field(default="smollm2-135m", description="Model for jobs submitted without --model.")
    device: str | None = Field(default=None, description="Torch device for the local backend; default cuda if present.")

    max_bundle: int = Field(default=64, ge=1, le=10_000, description="Most jobs in one bundle (one backend request).")
    max_invokes: int = Field(
        default=32, ge=1, le=4096, description="Most forward passes packed as invokes of one local trace."
    )
    max_attempts: int = Field(default=3, ge=1, le=100, description="Attempts before a job is failed for good.")
    retry_backoff_s: float = Field(default=2.0, ge=0, description="First retry delay; doubles per attempt.")
    retry_backoff_max_s: float = Field(default=300.0, ge=0, description="Longest retry delay.")
    lease_s: float = Field(default=300.0, gt=0, description="How long a claim lasts before another worker may take it.")
    poll_s: float = Field(default=1.0, gt=0, description="Worker sleep between polls of an empty queue.")
    db_retry_s: float = Field(
        default=120.0,
        ge=0,
        description="How long a queue operation retries (with backoff) while the database is unreachable, "
        "restarting or locked, before the command fails (the worker also waits this long for the database "
        "when it starts); 0: fail at once.",
    )

    bundle_time_limit_s: float = Field(
        default=3600.0, gt=0,
        description="Longest a local bundle's experiments may run (loading the model not counted); past it its jobs"
        " fail and the worker stops.",
    )

    # The ndif backend.
    allow_http_loopback: bool = Field(
        default=False, description="Accept a plain-http NDIF_HOST on loopback (a local NDIF); https otherwise."
    )
    bundle_deadline_s: float = Field(
        default=3600.0, gt=0, description="A request NDIF has not answered by then is abandoned and sent again."
    )
    max_result_bytes: int = Field(
        default=1 << 30, gt=0,
        description="Most result bytes in one NDIF request: bundles are packed under it by estimate, and a result "
        "whose download or decompressed size passes it by more than a quarter (+1 MiB) fails its jobs unread.",
    )
    http_timeout_s: float = Field(default=60.0, gt=0, description="Read timeout of one HTTP call to NDIF.")
    http_retries: int = Field(
        default=6, ge=1, le=100, description="Tries of one HTTP call before its bundle is retried later."
    )
    http_retry_max_s: float = Field(default=120.0, gt=0, description="Longest time spent retrying one HTTP call.")
    eviction_grace_s: float = Field(
        default=30.0, ge=0, description="After NDIF reports an evicted replica, how long to wait for a late COMPLETED."
    )
    poll_min_s: float = Field(default=0.25, gt=0, description="First wait between polls of a submitted request.")
    poll_max_s: float = Field(
        default=10.0, gt=0, le=1800.0,
        description="Longest wait between polls of a submitted request (at most half of the hour NDIF's result"
        " link lives, so a completed result is never left to expire while the worker runs).",
    )
    allow_cold: bool = Field(
        default=False,
        description="Send bundles for a model NDIF lists as not deployed or cold (NDIF then deploys it, which can"
        " take the slot of others); off: their jobs wait in the queue until NDIF lists the model running.",
    )
    status_cache_s: float = Field(
        default=5.0, ge=0, description="How long the worker reuses one answer of NDIF's /status (model readiness)."
    )
    model_wait_s: float = Field(
        default=30.0, gt=0, description="How often jobs waiting for a model NDIF does not run yet are looked at again."
    )
    local_standins: dict[str, str] = Field(
        default_factory=dict,
        description='JSON map of remote model -> local stand-in for local runs, '
        'e.g. {"meta-llama/Llama-3.1-70B": "smollm2-135m"}.',
    )

    imports: str = Field(
        default="",
        description="Comma-separated modules that define your own @experiment functions: a module name, a"
        " path/to/file.py, or path/to/folder:module. Environment or --import only.",
    )
    max_submit_jobs: int = Field(
        default=100_000, ge=1, description="Most jobs one submission (a params file) may create."
    )
    max_sweep_jobs: int = Field(default=100_000, ge=1, description="Most jobs one sweep file may expand to.")
    store_url: str | None = Field(
        default=None,
        description="s3://bucket/prefix: results on an S3-compatible object store that every machine of a shared"
        " queue reads (endpoint, region, credentials the standard AWS way); default: the data folder.",
    )
    cache_max: str = Field(
        default="20GiB", description="Most bytes of object-store results kept in this machine's cache (LRU out)."
    )
    store_local_ok: bool = Field(
        default=False, description="Let a worker on a shared queue keep its results on this machine only."
    )
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto", description="auto: readable lines on a terminal, JSON lines otherwise."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info")
    offline: bool = Field(default=False, description="Serve results from the store only: no network, no model loading.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read `.env` from the explicit `_env_file`, else from the data folder."""
        env_file = getattr(dotenv_settings, "env_file", None)
        if env_file is None:
            env_file = _data_folder(init_settings, env_settings) / ".env"
        return init_settings, env_settings, _TrustedDotEnv(settings_cls, env_file=env_file), file_secret_settings

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    models_cache: Path | None = Field(
        default=None, description="Where converted local models are kept; default: <home>/models."
    )

    @property
    def models_dir(self) -> Path:
        """Converted local models (the embedded GGUF model, dequantized once)."""
        return self.models_cache.expanduser().absolute() if self.models_cache else self.home / "models"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'queue.db'}"

    @property
    def import_modules(self) -> list[str]:
        return [name.strip() for name in self.imports.split(",") if name.strip()]


def _data_folder(init_settings: PydanticBaseSettingsSource, env_settings: PydanticBaseSettingsSource) -> Path:
    """The data folder as given to `Settings(home=...)` or by NDIF_JOBS_HOME, before any `.env`."""
    given = init_settings.init_kwargs.get("home") if isinstance(init_settings, InitSettingsSource) else None
    if given is None and isinstance(env_settings, EnvSettingsSource):
        given = env_settings.env_vars.get("ndif_jobs_home")
    return Path(given).expanduser().absolute() if given else _default_home()


class _TrustedDotEnv(DotEnvSettingsSource):
    """A `.env` source that drops the `ENV_ONLY` settings, saying so once on stderr."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        values = dict(super()._load_env_vars())
        refused = [name for name in ENV_ONLY if values.pop(name.lower(), None) is not None]
        if refused:
            _warn_refused(str(self.env_file), refused)
        return values


def _warn_refused(path: str, names: list[str]) -> None:
    if path in _warned:
        return
    _warned.add(path)
    sys.stderr.write(f"warning: {path} sets {', '.join(names)}: ignored (a .env file may not choose code to run"
                     f" or where the API key goes); {_HOW_TO_SET}\n")


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    """Forget the cached settings (after the environment changed, e.g. in tests)."""
    get_settings.cache_clear()


