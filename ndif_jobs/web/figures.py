"""A result's figure as PNG bytes, drawn once per result key and kept on disk.

The figure is the one `ndif-jobs plot` draws (`plots.plot_results`); drawing takes a second or
more, so the PNG is kept under `<data folder>/figures/<result key>.png` and served from there
until the result is gone. A result key names its content, so a kept figure never goes stale.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PlotError

if TYPE_CHECKING:
    from ..service import Service

# matplotlib's font cache and text layout are not made for several threads drawing at once.
_DRAWING = threading.Lock()


def figures_dir(service: Service) -> Path:
    from ..settings import ensure_private_dir

    return ensure_private_dir(service.settings.home / "figures")


def figure_png(service: Service, job_id: str) -> bytes:
    """The PNG of job `job_id`'s result figure. Raises `PlotError` (no plot for its experiment,
    matplotlib missing) and `ResultMissing` (no result)."""
    from ..errors import ResultMissing

    job = service.queue.get(job_id)
    if job.result_key is None:
        raise ResultMissing(f"job {job.id} has no result: it is {job.state}")
    cached = figures_dir(service) / f"{job.result_key}.png"
    if cached.is_file():
        return cached.read_bytes()
    result = service.load_result(job.id)
    from ..plots import plot_results

    tmp = cached.with_name(f".{job.result_key}.{secrets.token_hex(4)}.png")
    try:
        with _DRAWING:
            plot_results([result], tmp)
        os.replace(tmp, cached)
    except ValueError as exc:
        raise PlotError(str(exc)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return cached.read_bytes()
