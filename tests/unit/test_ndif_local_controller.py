"""scripts/ndif-local places NDIF's controller again when Ray's GCS was too busy to answer.

A GCS that stays silent past a driver's timeout cannot be produced on demand, so the server's
venv here is a stand-in whose `python` plays the controller launcher: it fails the way Ray's
driver does (or some other way), then succeeds. Everything else is the harness's own code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from ndif_local import harness  # noqa: E402

GCS_SILENT = "ConnectionError: Failed to connect to Ray cluster at 127.0.0.1:24003"


def _stack_with_launcher(tmp_path: Path, failures: list[str]) -> harness.Layout:
    """A layout whose venv `python` prints failures[i] and exits 1 on launch i, then exits 0."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    script = venv / "bin" / "python"
    count = tmp_path / "launches"
    lines = ["#!/bin/sh", f'n=$(cat "{count}" 2>/dev/null || echo 0)', f'echo $((n + 1)) > "{count}"']
    for i, failure in enumerate(failures):
        lines.append(f'[ "$n" = {i} ] && echo "{failure}" && exit 1')
    lines.append("exit 0")
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    layout = harness.Layout(tmp_path / "root", 24000, venv, None)
    for folder in (layout.run, layout.logs):
        folder.mkdir(parents=True, exist_ok=True)
    layout.record("ray", os.getpid(), ["ray"])  # a live Ray head
    return layout


def _launches(tmp_path: Path) -> int:
    return int((tmp_path / "launches").read_text())


def test_a_controller_launch_that_found_the_gcs_silent_is_tried_again(tmp_path: Path) -> None:
    layout = _stack_with_launcher(tmp_path, [GCS_SILENT, "Timed out while waiting for GCS to become available."])

    harness.finish_controller(layout, {}, harness.launch_controller(layout, {}), timeout=30)

    assert _launches(tmp_path) == 3


def test_a_controller_launch_is_tried_at_most_three_times(tmp_path: Path) -> None:
    layout = _stack_with_launcher(tmp_path, [GCS_SILENT] * 4)

    with pytest.raises(harness.Failure, match=r"(?s)controller launch failed \(1\).*Failed to connect to Ray"):
        harness.finish_controller(layout, {}, harness.launch_controller(layout, {}), timeout=30)
    assert _launches(tmp_path) == harness.CONTROLLER_LAUNCHES


def test_a_controller_launch_that_failed_for_another_reason_is_not_tried_again(tmp_path: Path) -> None:
    layout = _stack_with_launcher(tmp_path, ["ImportError: no module named ndif_cpu_shim"])

    with pytest.raises(harness.Failure, match="ImportError"):
        harness.finish_controller(layout, {}, harness.launch_controller(layout, {}), timeout=30)
    assert _launches(tmp_path) == 1


def test_a_controller_launch_is_not_tried_again_once_the_ray_head_is_gone(tmp_path: Path) -> None:
    layout = _stack_with_launcher(tmp_path, [GCS_SILENT])
    layout.forget("ray")

    with pytest.raises(harness.Failure, match="Failed to connect to Ray"):
        harness.finish_controller(layout, {}, harness.launch_controller(layout, {}), timeout=30)
    assert _launches(tmp_path) == 1
