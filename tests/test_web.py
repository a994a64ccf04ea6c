"""The results pages in a real browser: Debian's headless chromium driven by selenium.

One queue (a real SQLite file) is seeded with a job in every state through the queue's own
operations, one app is served by uvicorn on loopback, one browser session drives it for the
whole module. A real worker runs a real job on a tiny model while the browser watches.
Set NDIF_UI_SCREENSHOTS=docs to write the overview and a job page as PNGs there.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import MODELS_CACHE, REPO, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCRIPT_PROMPT = "<script>window.pwned = 1</script> & friends"
FOREIGN_WORKER = "elsewhere:4242:1700000000:beef"  # a worker on another host: never judged gone here
IDLE_WORKER = "idle-host:777:1700000000:cafe"  # registered in the workers table, holding nothing
TOKEN = "a-test-token-" + "x" * 20
SWEEP = "grid-<i>"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (scripts/setup installs them: apt-get install -y chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def web_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A private data folder for the module, in this process's environment and a worker's."""
    from ndif_jobs.settings import reset_settings_cache

    values = {"NDIF_JOBS_HOME": str(tmp_path_factory.mktemp("web") / "home"),
              "NDIF_JOBS_MODELS_CACHE": str(MODELS_CACHE), "NDIF_JOBS_LOG_FORMAT": "json", "NDIF_JOBS_POLL_S": "0.2"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        reset_settings_cache()
        yield {**os.environ, **values}
    reset_settings_cache()


@pytest.fixture(scope="module")
def service(web_env: dict[str, str]):  # type: ignore[no-untyped-def]
    from ndif_jobs.db.engine import dispose_engines
    from ndif_jobs.service import Service
    from ndif_jobs.settings import Settings

    yield Service(Settings())
    dispose_engines()


def _new_job(n: int, prompt: str = "Hello", tags: tuple[str, ...] = ("night",)) -> Any:
    from ndif_jobs.db.queue import NewJob

    # NDIF jobs on a model no worker here runs: the local worker of the live test leaves them be.
    return NewJob(key=f"{n:064x}", experiment="activations", model="example-org/model-7b", model_key="mk",
                  backend="ndif", params={"prompt": prompt}, tags=list(tags))


@pytest.fixture(scope="module")
def seeded(service) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A queue with a job in every state, made by the queue's own operations. Returns ids by role."""
    from ndif_jobs.db.remote import RemoteBundles

    queue = service.queue
    queue.enqueue([_new_job(n) for n in range(1, 8)])
    escaped = queue.enqueue([_new_job(100, prompt=SCRIPT_PROMPT, tags=("odd",))])[0].id
    claimed = queue.claim(FOREIGN_WORKER, 5, 3600, backend="ndif")
    claimed_ids = [job.id for job in claimed]
    bundle = queue.start_bundle(FOREIGN_WORKER, "ndif", "mk", claimed_ids[1:])
    remote = RemoteBundles(queue.db)
    remote.mark_submitted(FOREIGN_WORKER, bundle, "remote-job-id-0123456789", [claimed_ids[2]], None)
    remote.record_status(bundle, "RUNNING", "see https://ndif.example/results/remote-job-id-0123456789")
    done_key = "d" * 64
    size = service.store.put(done_key, {"answer": 42})
    queue.complete(FOREIGN_WORKER, [(claimed_ids[3], done_key, size)])
    queue.fail(FOREIGN_WORKER, [(claimed_ids[4], "Traceback (most recent call last):\n  File \"x.py\"\nValueError: "
                                                 "the layer <b>99</b> is out of range")])
    cancelled = queue.enqueue([_new_job(200)])[0].id
    queue.cancel([cancelled])
    cached_job = _new_job(300)
    cached_job.key = queue.get(claimed_ids[3]).key
    cached = queue.enqueue([cached_job])[0]
    assert cached.state == "cached"
    from ndif_jobs.db.sweeps import Sweeps

    Sweeps(queue).save(SWEEP, "0" * 64, "name: grid", {"name": SWEEP})
    rows = [_new_job(400 + row, prompt=f"row {row}", tags=()) for row in range(2)]
    for row, job in enumerate(rows):
        job.sweep, job.sweep_row = SWEEP, row
    queue.enqueue(rows)
    from ndif_jobs.db.workers import Workers

    # A worker that beats but holds no job (waiting for work): the overview lists it too.
    Workers.of_queue(queue).register(IDLE_WORKER, "idle-host", 777, "ndif", time.time())
    return {"escaped": escaped, "claimed": claimed_ids[0], "submitted": claimed_ids[2], "failed": claimed_ids[4],
            "completed": claimed_ids[3]}


class Served:
    """The app served by uvicorn on a loopback port in a thread of this process."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=20, what="uvicorn to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def server(service, seeded) -> Iterator[Served]:  # type: ignore[no-untyped-def]
    from ndif_jobs.web.app import create_app

    served = Served(create_app(service))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1360,1000", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(browser: Any, condition: Any, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)


def _text(browser: Any, css: str) -> str:
    """The element's text, read in one script (a live refresh may replace it between two calls)."""
    text = browser.execute_script("const e = document.querySelector(arguments[0]); return e && e.innerText", css)
    assert text is not None, f"no {css} on {browser.current_url}"
    return str(text).strip()


def _screenshot(browser: Any, name: str, height: int = 1000) -> None:
    folder = os.environ.get("NDIF_UI_SCREENSHOTS")
    if folder:
        target = Path(folder) if Path(folder).is_absolute() else REPO / folder
        browser.set_window_size(1360, height)
        browser.save_screenshot(str(target / name))
        browser.set_window_size(1360, 1000)


def test_the_overview_counts_a_queue_with_a_job_in_every_state(server, browser, service) -> None:  # type: ignore[no-untyped-def]
    browser.get(server.url + "/")
    counts = service.queue.counts()
    shown = {state: int(_text(browser, f'a[data-state="{state}"]')) for state in counts}
    assert shown == {str(k): v for k, v in counts.items()}
    assert all(n >= 1 for n in shown.values()), f"the seeded queue misses a state: {shown}"
    assert "night" in _text(browser, "body") and "odd" in _text(browser, "body")
    workers = _text(browser, "#workers")
    assert "elsewhere" in workers and "4242" in workers  # seen by the leases it holds (it has no row)
    assert "idle-host" in workers and "777" in workers  # seen by its row, holding no job
    assert SWEEP in _text(browser, "body")
    at_ndif = _text(browser, "#at-ndif")
    assert "RUNNING" in at_ndif
    assert "remote-job-id" not in browser.page_source and "ndif.example" not in browser.page_source
    _screenshot(browser, "ui-overview.png", height=760)


@pytest.mark.slow  # runs the tiny model (built from the embedded one)
def test_a_job_is_seen_going_from_queued_to_completed_without_a_reload(server, browser, service, web_env, tiny_gpt2) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    from ndif_jobs.service import Submission

    job = service.submit(Submission("activations", {"prompt": "Hello there", "layers": [0, 1]}, model=str(tiny_gpt2),
                                    backend="local"))
    browser.get(f"{server.url}/jobs/{job.id}")
    assert _text(browser, "#job-state") == "queued"
    browser.execute_script("window.sameDocument = 'yes'")
    from ndif_jobs.worker import Worker

    stats: list[Any] = []
    worker = threading.Thread(target=lambda: stats.append(Worker(service, backend="local").run(until_empty=True)))
    worker.start()
    try:
        _wait(browser, lambda b: _text(b, "#job-state") == "completed", timeout=180)
    finally:
        worker.join(timeout=120)
    assert stats and stats[0].completed == 1
    assert browser.execute_script("return window.sameDocument") == "yes", "the page was reloaded"
    image = _wait(browser, lambda b: b.find_element(By.ID, "figure"), timeout=10)
    _wait(browser, lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image),
          timeout=60)
    assert image.size["width"] > 100 and image.size["height"] > 100
    assert "largest block-output norm" in _text(browser, "#summary")
    names = _text(browser, "#names")
    assert "norms" in names and "float32 [2]" in names
    _screenshot(browser, "ui-job.png", height=1900)
    assert list((Path(web_env["NDIF_JOBS_HOME"]) / "figures").glob("*.png")), "the figure was not cached on disk"
    import httpx

    exported = httpx.get(f"{server.url}/jobs/{job.id}/export/json")
    assert exported.status_code == 200 and "norms" in exported.json()["values"]
    assert f'{job.id}.json' in exported.headers["content-disposition"]


def test_a_failed_job_retried_from_its_page_is_queued_again(server, browser, service, seeded) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/jobs/{seeded['failed']}")
    assert _text(browser, "#job-state") == "failed"
    summary = browser.find_element(By.CSS_SELECTOR, "#attempts details summary")
    assert "<b>99</b>" in summary.text, "the traceback's last line, as text"
    assert not browser.find_element(By.CSS_SELECTOR, "#attempts details pre").is_displayed(), "tracebacks start folded"
    browser.find_element(By.ID, "retry").click()
    _wait(browser, lambda b: _text(b, "#job-state") == "queued")
    assert str(service.queue.get(seeded["failed"]).state) == "queued"


def test_a_script_in_a_prompt_is_shown_as_text_and_never_runs(server, browser, seeded) -> None:  # type: ignore[no-untyped-def]
    browser.get(f"{server.url}/jobs/{seeded['escaped']}")
    assert SCRIPT_PROMPT in _text(browser, "#params")
    assert browser.execute_script("return window.pwned") is None
    browser.get(f"{server.url}/jobs?text=pwned")
    assert SCRIPT_PROMPT[:30] in _text(browser, "#jobs")
    assert browser.execute_script("return window.pwned") is None


def test_a_form_without_the_csrf_token_changes_nothing(server, service, seeded) -> None:  # type: ignore[no-untyped-def]
    import httpx

    job = seeded["claimed"]
    page = httpx.get(f"{server.url}/jobs/{job}").text
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is not None
    for form in ({}, {"csrf": "not-the-token"}):
        answer = httpx.post(f"{server.url}/jobs/{job}/cancel", data=form)
        assert answer.status_code == 403
    assert str(service.queue.get(job).state) == "claimed"
    assert httpx.post(f"{server.url}/jobs/{job}/cancel", data={"csrf": token.group(1)}).status_code == 303
    assert str(service.queue.get(job).state) == "cancelled"


def test_with_a_token_every_page_is_refused_without_it_and_served_with_it(service, seeded, browser) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from ndif_jobs.web.app import create_app

    served = Served(create_app(service, token=TOKEN))
    try:
        for path in ("/", "/jobs", f"/jobs/{seeded['submitted']}", "/static/live.js", f"/jobs/{seeded['completed']}/export/json"):
            assert httpx.get(served.url + path).status_code == 401, path
            assert httpx.get(served.url + path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "y"}).status_code == 401
        assert httpx.get(served.url + "/", headers={"Authorization": "Bearer " + TOKEN}).status_code == 200
        browser.delete_all_cookies()
        browser.get(served.url + "/jobs")
        assert "401" in _text(browser, "body")
        browser.get(f"{served.url}/?token={TOKEN}")
        assert browser.current_url == served.url + "/", "the token is dropped from the address"
        assert _text(browser, "#counts")
        browser.get(f"{served.url}/jobs/{seeded['submitted']}")
        assert _text(browser, "#ndif-job-id") == "remote-job-id-0123456789", "shown behind the token only"
    finally:
        served.stop()



def _completed_local_job(service) -> str:  # type: ignore[no-untyped-def]
    done = [r.id for r in service.queue.list_jobs(state="completed", limit=None) if r.backend == "local"]
    assert done, "runs after the live test, which completes a job on the tiny model"
    return done[0]


@pytest.mark.slow  # runs the tiny model (built from the embedded one)
def test_a_report_is_one_file_that_opens_with_its_figures_and_no_network(service, seeded, browser, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.web.report import write_report

    done = _completed_local_job(service)
    out, count = write_report(service, tmp_path / "report.html", job_refs=[done, seeded["escaped"], seeded["submitted"]])
    html = out.read_text()
    assert count == 3
    assert "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=["']?(https?:|//|/)""", html), "everything is inline"
    assert "<script" not in html.replace("&lt;script", "")
    assert "remote-job-id" not in html and "ndif.example" not in html
    browser.get(out.as_uri())
    assert SCRIPT_PROMPT in _text(browser, f"#job-{seeded['escaped']} pre.params")
    assert browser.execute_script("return window.pwned") is None
    assert browser.execute_script("return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert browser.execute_script("return document.images.length") == 1


@pytest.mark.slow  # runs the tiny model (built from the embedded one)
def test_a_result_and_a_job_show_themselves_in_a_notebook(service, seeded) -> None:  # type: ignore[no-untyped-def]
    from ndif_jobs.api import Job
    from ndif_jobs.web.notebook import job_html, result_html

    html = result_html(service.load_result(_completed_local_job(service)))
    assert "data:image/png;base64," in html and "norms" in html and "largest block-output norm" in html
    queued = job_html(Job(seeded["escaped"], "queued"), settings=service.settings)
    assert "<b>queued</b>" in queued and "ndif-jobs worker" in queued and "&lt;script" not in queued
    assert "load_result" in job_html(Job(_completed_local_job(service), "queued"), settings=service.settings)
    from ndif_jobs.collection import collect
    from ndif_jobs.web.notebook import collection_html

    table = collection_html(collect(jobs=[_completed_local_job(service), seeded["escaped"]], settings=service.settings))
    assert "&lt;script&gt;window.pwned" in table and "<script" not in table
    assert "2 of 2 rows" in table


def test_a_sweep_page_shows_its_progress_and_gives_its_table(server, seeded) -> None:  # type: ignore[no-untyped-def]
    import httpx

    page = httpx.get(f"{server.url}/sweeps/grid-%3Ci%3E")
    assert page.status_code == 200 and "grid-&lt;i&gt;" in page.text and "0/2 done" in page.text
    table = httpx.get(f"{server.url}/sweeps/grid-%3Ci%3E/table.csv")
    assert table.status_code == 200 and table.text.splitlines()[0].startswith("job_id,")
    assert len(table.text.splitlines()) == 3
    assert httpx.get(f"{server.url}/sweeps/nope").status_code == 400
