"""Where the data lies, read without pydantic: the settings of the CLI's read commands.

`status`, `list` and `show` need only the data folder, the database URL and how long to retry
it. Importing pydantic-settings and validating every field costs them more than all their
queries, so `read_settings` reads those few from the same sources as `Settings` (the
environment first, then `--env-file` or the data folder's `.env`), and gives up, returning None,
whenever anything is set that it would not read exactly as `Settings` does: any other
`NDIF_JOBS_*` name, a value it does not parse plainly, a `.env` line with quotes, `$` or
`export`, or a `.env` that sets what only the environment may (`ENV_ONLY`, which `Settings`
refuses with a warning). The caller then builds the full `Settings`, with its
validation, defaults and error messages.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

PREFIX = "ndif_jobs_"
#: The settings read here, by their lower-case variable names.
_READ = {"ndif_jobs_home", "ndif_jobs_database_url", "ndif_jobs_db_retry_s", "ndif_jobs_offline"}
#: Settings the read commands do not use, checked as `Settings` checks them, so that a value it
#: would refuse is left to it: any text; a number above 0 (with no upper bound, or the one named
#: in `_AT_MOST`); one of a few words; true or false.
_ANY_TEXT = {"ndif_host", "ndif_api_key", "ndif_jobs_default_model", "ndif_jobs_device", "ndif_jobs_models_cache"}
_POSITIVE = {f"ndif_jobs_{name}" for name in (
    "retry_backoff_s", "retry_backoff_max_s", "lease_s", "poll_s", "db_retry_s", "bundle_time_limit_s",
    "bundle_deadline_s", "http_timeout_s", "http_retry_max_s", "eviction_grace_s", "poll_min_s", "poll_max_s")}
_AT_MOST = {"ndif_jobs_poll_max_s": 1800.0}
_CHOICES = {"ndif_jobs_log_level": {"debug", "info", "warning", "error"},
            "ndif_jobs_log_format": {"auto", "console", "json"},
            "ndif_jobs_default_backend": {"local", "ndif"}}
_FLAGS = {"ndif_jobs_offline", "ndif_jobs_allow_http_loopback"}
#: Settings that choose code to import, where the API key goes, or the database whose jobs a
#: worker runs with the user's key and machine: accepted from the environment or the command line
#: only (`Settings` drops them from a `.env`, saying so; `read_settings` leaves such a file to it).
ENV_ONLY = ("NDIF_HOST", "NDIF_JOBS_IMPORTS", "NDIF_JOBS_DATABASE_URL")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NUMBER = re.compile(r"\d+(\.\d+)?")
_DOTENV_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([^\s'\"$#\\`]*)")
DEFAULT_DB_RETRY_S = 120.0


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """The part of `Settings` that the queue's read commands use, with the same names."""

    home: Path
    database_url: str | None = None
    db_retry_s: float = DEFAULT_DB_RETRY_S
    offline: bool = False
    imports: str = ""

    @property
    def results_dir(self) -> Path:
        return self.home / "results"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'queue.db'}"

    @property
    def import_modules(self) -> list[str]:
        return []

    @property
    def local_standins(self) -> dict[str, str]:
        return {}


def read_settings(env_file: Path | None = None, environ: Mapping[str, str] | None = None) -> ReadSettings | None:
    """The read commands' settings, or None where `Settings` must read them (see the module)."""
    env = {name.lower(): value for name, value in (os.environ if environ is None else environ).items()}
    given = {name: value for name, value in env.items() if name.startswith(PREFIX) or name in _ANY_TEXT}
    home = _home(given.get("ndif_jobs_home"))
    if home is None:
        return None
    dotenv = _read_dotenv(env_file if env_file is not None else home / ".env")
    if dotenv is None or {name.lower() for name in ENV_ONLY} & dotenv.keys():
        return None
    dotenv = {name: value for name, value in dotenv.items() if name.startswith(PREFIX) or name in _ANY_TEXT}
    values = {**dotenv, **given}
    if "ndif_jobs_home" in dotenv and "ndif_jobs_home" not in given:
        home = _home(dotenv["ndif_jobs_home"])
        if home is None:
            return None
    if not all(_plainly_valid(name, value) for name, value in values.items()):
        return None
    retry = values.get("ndif_jobs_db_retry_s")
    offline = values.get("ndif_jobs_offline", "0").lower()
    return ReadSettings(
        home=home,
        database_url=values.get("ndif_jobs_database_url"),
        db_retry_s=float(retry) if retry is not None else DEFAULT_DB_RETRY_S,
        offline=offline in _TRUE,
    )


def _plainly_valid(name: str, value: str) -> bool:
    """Whether `Settings` would take `value` for `name` as it is (False: leave it to `Settings`)."""
    if name in _ANY_TEXT:
        return True
    if name == "ndif_jobs_home" or name == "ndif_jobs_database_url":
        return bool(value.strip())
    if name in _POSITIVE:
        return _NUMBER.fullmatch(value) is not None and 0 < float(value) <= _AT_MOST.get(name, float("inf"))
    if name in _CHOICES:
        return value in _CHOICES[name]
    if name in _FLAGS:
        return value.lower() in _TRUE | _FALSE
    return False


def _home(value: str | None) -> Path | None:
    if value is None:
        from platformdirs import user_data_dir

        return Path(user_data_dir("ndif-jobs", appauthor=False))
    return Path(value).expanduser().absolute() if value.strip() else None


def _read_dotenv(path: Path) -> dict[str, str] | None:
    """`path`'s `NAME=value` lines, names in lower case; {} when there is no such file; None when
    a line is anything but a plain assignment, a comment or blank (python-dotenv reads those)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError):
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _DOTENV_LINE.fullmatch(line)
        if match is None:
            return None
        values[match.group(1).lower()] = match.group(2)
    return values


def ensure_private_dir(path: Path) -> Path:
    """Create `path` readable by its owner only (results may hold unpublished findings)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.chmod(path, 0o700)
    except PermissionError:
        pass
    return path
