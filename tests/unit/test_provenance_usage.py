"""The arithmetic of `ndif-jobs usage` and of the times a result records: a request's time queued
and running at NDIF from its status history as the polls saw it, per-group sums that count a
request for every group it carried jobs of (and once in the total), and `--since`/`--by`. And
NDIF's `GET /env` as a result records it, answered or not (NDIF scripted with
`httpx.MockTransport`, as in test_ndif_http.py; the real server's answer: tests/test_provenance.py)."""

from __future__ import annotations

import datetime
from pathlib import Path

import httpx
import pytest

from ndif_jobs.errors import BadInput
from ndif_jobs.provenance import remote_times, server_versions
from ndif_jobs.usage import Member, Request, check_by, parse_since, tally

from .test_ndif_http import Script, make_settings, on_mock, refused


def h(*entries: tuple[str, float]) -> list[dict[str, object]]:
    return [{"status": s, "at": at, "description": ""} for s, at in entries]


def test_queued_until_it_was_seen_running_then_running_until_completed() -> None:
    times = remote_times(h(("SUBMITTED", 100), ("QUEUED", 101), ("DISPATCHED", 104), ("RUNNING", 105),
                           ("COMPLETED", 109)), 100)
    assert times is not None and times.ended
    assert (times.queued_s, times.running_s) == (4, 5)


def test_a_request_that_ran_between_two_polls_ran_from_the_last_status_seen_before_its_end() -> None:
    times = remote_times(h(("SUBMITTED", 10), ("QUEUED", 12), ("COMPLETED", 20)))
    assert times is not None and (times.queued_s, times.running_s) == (2, 8)
    direct = remote_times(h(("SUBMITTED", 10), ("COMPLETED", 13)))
    assert direct is not None and (direct.queued_s, direct.running_s) == (0, 3)


def test_an_evicted_request_that_completes_later_ends_at_completed_and_notes_of_ours_are_not_statuses() -> None:
    times = remote_times(h(("SUBMITTED", 0), ("RUNNING", 2), ("REATTACHED", 3), ("ERROR", 5), ("COMPLETED", 9)))
    assert times is not None and (times.queued_s, times.running_s) == (2, 7)


def test_a_request_still_at_ndif_counts_up_to_its_latest_status_and_one_given_up_ends_there() -> None:
    waiting = remote_times(h(("SUBMITTED", 0), ("QUEUED", 1), ("DEPLOYING", 30)))
    assert waiting is not None and not waiting.ended and (waiting.queued_s, waiting.running_s) == (30, 0)
    abandoned = remote_times(h(("SUBMITTED", 0), ("RUNNING", 5), ("ABANDONED", 50)))
    assert abandoned is not None and abandoned.ended and (abandoned.queued_s, abandoned.running_s) == (5, 45)
    assert remote_times([]) is None


def test_server_versions_keep_the_deciding_packages_or_say_why_there_are_none() -> None:
    env = {"python_version": "3.12.3 (main, Apr  1 2026) [GCC 13.2.0]",
           "packages": {"torch": "2.8.0", "nnsight": "0.8.1", "transformers": "4.57.0", "ndif": "0.1.2",
                        "numpy": "2.3.0"}}
    assert server_versions(env) == {"answered": True, "python": "3.12.3", "nnsight": "0.8.1", "torch": "2.8.0",
                                    "transformers": "4.57.0", "ndif": "0.1.2"}
    assert server_versions({"error": "NDIF answered 404"}) == {"answered": False, "error": "NDIF answered 404"}


def test_ndif_env_is_recorded_when_answered_and_why_not_when_not_and_asked_once_per_worker(tmp_path: Path) -> None:
    from ndif_jobs.backends.ndif import NdifBackend

    backend = NdifBackend(make_settings(tmp_path, http_retries=1))
    script = Script([httpx.Response(404, json={"detail": "Not Found"})])
    on_mock(backend.client, script)
    first = server_versions(backend.server_env())
    assert not first["answered"] and "404" in first["error"]
    assert backend.server_env() == {"error": first["error"]} and len(script.requests) == 1  # not asked again yet

    answered = NdifBackend(make_settings(tmp_path, http_retries=1))
    script = Script([httpx.Response(200, json={"python_version": "3.12.1 (main)", "packages": {"nnsight": "0.8.1"}})])
    on_mock(answered.client, script)
    facts = answered.provenance(None)  # type: ignore[arg-type]  # NDIF's facts do not depend on the model
    assert facts["host"] == "https://ndif.test" and server_versions(facts["server_env"])["nnsight"] == "0.8.1"
    answered.server_env()
    assert [r.url.path for r in script.requests] == ["/env"]

    down = NdifBackend(make_settings(tmp_path, http_retries=1))
    on_mock(down.client, Script([refused()]))
    assert "cannot reach NDIF" in down.server_env()["error"]


def request(bundle: str, up: int, down: int, queued: float, running: float, *members: Member) -> Request:
    return Request(bundle_id=bundle, submitted_at=0.0, bytes_up=up, bytes_down=down, queued_s=queued,
                   running_s=running, members=members)


A = Member("a1", "org/big", ("night",), "sw")
B = Member("b1", "org/big", ("night", "probe"), "sw")
C = Member("c1", "org/small", (), None)


def test_a_request_counts_for_each_group_it_carried_jobs_of_and_once_in_the_total() -> None:
    requests = [request("r1", 100, 1000, 2.0, 3.0, A, B), request("r2", 10, 50, 1.0, 1.0, C)]
    by_tag = tally(requests, "tag")
    assert by_tag.total.as_dict() == {"requests": 2, "jobs": 3, "bytes_up": 110, "bytes_down": 1050,
                                      "queued_s": 3.0, "running_s": 4.0}
    night, probe, none = by_tag.groups["night"], by_tag.groups["probe"], by_tag.groups["(none)"]
    assert (night.requests, night.jobs, night.bytes_up, night.running_s) == (1, 2, 100, 3.0)
    assert (probe.requests, probe.jobs, probe.bytes_down) == (1, 1, 1000)
    assert (none.requests, none.jobs, none.bytes_up) == (1, 1, 10)
    assert by_tag.overlapping
    by_model = tally(requests, "model")
    assert {k: (u.requests, u.jobs) for k, u in by_model.groups.items()} == {"org/big": (1, 2), "org/small": (1, 1)}
    assert not by_model.overlapping
    by_sweep = tally(requests, "sweep")
    assert list(by_sweep.groups) == ["(none)", "sw"]
    assert tally(requests).groups == {}


def test_since_takes_a_date_a_time_or_an_age_and_by_takes_a_grouping() -> None:
    now = 1_800_000_000.0
    assert parse_since("90m", now) == now - 5400
    assert parse_since("7d", now) == now - 7 * 86400
    assert parse_since("2026-11-29", now) == datetime.datetime(2026, 11, 29).timestamp()
    assert parse_since("2026-11-29T18:00+00:00", now) == datetime.datetime(
        2026, 11, 29, 18, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_since(None, now) is None
    with pytest.raises(BadInput, match=r"--since takes a date .* not 'last week'"):
        parse_since("last week", now)
    assert check_by("sweep") == "sweep"
    with pytest.raises(BadInput, match="--by takes tag, sweep, model, not 'user'"):
        check_by("user")
