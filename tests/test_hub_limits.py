"""priorzoo's bounded Hub waits (priorzoo/hub_limits.py): the stall rule, the user's HF_HUB_* timeouts, and
huggingface_hub's client left as it was."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, patch_hf_env

from priorzoo import PriorModel
from priorzoo import hub_limits as limits_module
from priorzoo.cli import main
from priorzoo.errors import PriorNotFoundError
from priorzoo.hub import download_prior, upload_prior
from priorzoo.hub_limits import HubLimits, HubTimeoutError, Progress, limits_from_env, run_bounded

REPO_ROOT = Path(__file__).resolve().parents[1]


def small(scale: float = 1.0) -> PriorModel:
    return PriorModel.from_tensors({"w": torch.zeros(8, 8)}, variance={"w": torch.ones(8, 8)}, scale=scale)


# --------------------------------------------------------------------------------------------- the rule
@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(limits_module.time, "monotonic", lambda: now[0])
    return now


class Bar:
    """What the rule reads of a progress bar: unit, total and count."""

    def __init__(self, total: int, n: int = 0) -> None:
        self.unit, self.total, self.n = "B", total, n


def test_the_stall_rule_bounds_the_average_rate_over_the_window_not_the_gap_between_bytes(clock: list[float]) -> None:
    rule = HubLimits(window=30, min_rate=1000)
    progress = Progress()
    progress.begin("waiting for headers")  # no body is due: only the window counts
    clock[0] += 30
    assert progress.stalled(rule) is None
    clock[0] += 1
    assert "stalled while waiting for headers: under 1000 bytes/s over the last 31 s" in progress.stalled(rule)

    progress.bars.append(Bar(total=5_000_000))  # a file body of 5 MB (under one chunk) may arrive unseen
    progress.event()
    clock[0] += 4_900
    assert progress.stalled(rule) is None  # 5 MB in 4,900 s could still be above 1000 bytes/s
    clock[0] += 200
    assert progress.stalled(rule) is not None  # in 5,100 s it cannot any more

    progress.bars[0].n = 5_000_000 - 300  # the last 300 bytes: a byte every 5 s is under the floor after the window
    progress.event()
    clock[0] += 31
    assert "(at most 300 bytes arrived unseen)" in progress.stalled(rule)


def test_a_cancelled_worker_stops_at_its_next_report() -> None:
    progress = Progress()
    progress.cancelled.set()
    with pytest.raises(HubTimeoutError, match="given up while starting"):
        progress.event()


def test_limits_from_env() -> None:
    assert limits_from_env({}) == HubLimits(window=30.0, min_rate=51200.0, deadline=None)
    env = {"PRIORZOO_HUB_STALL_WINDOW": "2", "PRIORZOO_HUB_MIN_RATE": "10", "PRIORZOO_HUB_DEADLINE": "60"}
    assert limits_from_env(env) == HubLimits(window=2.0, min_rate=10.0, deadline=60.0)
    for bad in ("soon", "-1", "inf", "nan"):
        with pytest.raises(ValueError, match=rf"`PRIORZOO_HUB_STALL_WINDOW` must be a number > 0; received '{bad}'"):
            limits_from_env({"PRIORZOO_HUB_STALL_WINDOW": bad})


def test_run_bounded_returns_and_raises_what_the_worker_did() -> None:
    assert run_bounded(lambda p: "done", HubLimits(window=5), what="x") == "done"
    with pytest.raises(KeyError, match="boom"):
        run_bounded(lambda p: {}["boom"], HubLimits(window=5), what="x")


def test_the_deadline_ends_a_call_that_keeps_reporting() -> None:
    stop = threading.Event()

    def busy(progress: Progress) -> None:
        while not stop.wait(0.01):
            progress.begin("looping")

    try:
        with pytest.raises(HubTimeoutError, match=r"not done within the 0\.3 s deadline"):
            run_bounded(busy, HubLimits(window=60, deadline=0.3), what="a busy call", poll=0.05)
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------- misbehaving servers
class RawServer:
    """Accepts connections and never answers (``drip=None``), or sends a status line then one header byte every
    ``drip`` seconds, for ever."""

    def __init__(self, drip: float | None) -> None:
        self.drip = drip
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            if self.drip is not None:
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
            while not self.stop.wait(self.drip or 0.5):
                if self.drip is not None:
                    conn.sendall(b"x")
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()


def join_abandoned(timeout: float = 30.0) -> None:
    """Wait for the workers priorzoo gave up on (they end at their next progress report, or when their request
    fails), so that none of them touches huggingface_hub's shared client during a later test."""
    for thread in threading.enumerate():
        if thread.name.startswith("priorzoo-hub:"):
            thread.join(timeout)


def short_limits(monkeypatch: pytest.MonkeyPatch, user_timeout: int = 1) -> None:
    """A 1 s stall window, and the user's HF timeouts at ``user_timeout`` s (the window is never shorter)."""
    from huggingface_hub import constants

    monkeypatch.setenv("PRIORZOO_HUB_STALL_WINDOW", "1")
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):  # as read from the user's environment
        monkeypatch.setattr(constants, name, user_timeout)


@pytest.fixture(params=[None, 0.2], ids=["never-answers", "drips"])
def raw_hub(request, tmp_path_factory, monkeypatch) -> Iterator[RawServer]:
    server = RawServer(request.param)
    patch_hf_env(monkeypatch, server.url, tmp_path_factory.mktemp("hf_home"))
    short_limits(monkeypatch)
    yield server
    server.close()
    join_abandoned()


def one_line_error(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"priorzoo {command}: error: ") and err.count("\n") == 1, err
    return err


def test_a_hub_that_hangs_or_drips_ends_in_the_one_line_error(raw_hub: RawServer, capsys) -> None:
    # huggingface_hub's own limits: a silent server holds hf_hub_download 394 s, a dripping one for ever
    with pytest.raises(PriorNotFoundError, match=r"Can't find 'config.json' at 'org/p': the Hub at .* did not answer"):
        PriorModel.from_pretrained("org/p")
    assert main(["pull", "org/p"]) == 2
    line = one_line_error(capsys, "pull")
    assert "stalled while resolving 'org/p' to a commit" in line and "PRIORZOO_HUB_STALL_WINDOW" in line


def test_a_file_dripping_one_byte_at_a_time_is_given_up(hub_server: HubServer, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    upload_prior(small().save_pretrained(tmp_path / "p"), "org/p")
    hub_server.drip = 0.2  # config.json alone would take minutes
    short_limits(monkeypatch)
    monkeypatch.setenv("PRIORZOO_HUB_MIN_RATE", "1000")
    with pytest.raises(PriorNotFoundError, match=r"stalled while downloading .* under 1000 bytes/s over the last"):
        download_prior("org/p")
    hub_server.drip = None
    join_abandoned()


@pytest.mark.parametrize("user_timeout", [1, 5])
def test_the_window_is_never_shorter_than_the_users_hf_timeouts(
    hub_server: HubServer, monkeypatch, tmp_path, user_timeout: int
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    upload_prior(small().save_pretrained(tmp_path / "p"), "org/p")
    # the repo's revision info comes after 2.5 s; huggingface_hub sends that request without a timeout
    slow = "/api/models/org/p/revision/"
    hub_server.on_request = lambda method, path: time.sleep(2.5) if path.startswith(slow) else None
    short_limits(monkeypatch, user_timeout)
    if user_timeout == 1:
        with pytest.raises(PriorNotFoundError, match="stall window 1 s"):
            download_prior("org/p")
        join_abandoned()
    else:  # the user allows 5 s per read: a 2.5 s wait is theirs to allow, the 1 s window does not cut it
        assert (download_prior("org/p") / "config.json").is_file()


def test_a_hanging_hub_falls_back_to_the_cache(hub_server: HubServer, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    upload_prior(small(2.0).save_pretrained(tmp_path / "p"), "org/p")
    cached = download_prior("org/p")
    silent = RawServer(None)
    try:
        patch_hf_env(monkeypatch, silent.url, cached.parents[3])  # same HF_HOME, a Hub that hangs
        short_limits(monkeypatch)
        assert download_prior("org/p") == cached
        assert PriorModel.from_pretrained("org/p").scale == 2.0
    finally:
        silent.close()
        join_abandoned()


@pytest.mark.slow  # the worker given up on retries for ~20 s before it ends
def test_a_worker_given_up_on_that_closes_the_shared_client_does_not_fail_a_later_download(
    hub_server: HubServer, monkeypatch, tmp_path
) -> None:
    """huggingface_hub closes its shared HTTP client when a retry cannot connect (`close_session`). A worker priorzoo
    gave up on still retries (a file's metadata), and once its Hub refuses connections it closes the client that a
    later download is reading from: that download failed with `ReadError: Bad file descriptor`. It is now run again."""
    from huggingface_hub import constants, get_session

    prior = small(4.0).save_pretrained(tmp_path / "p")
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    upload_prior(prior, "org/p")  # the healthy Hub of the later download
    healthy = hub_server.url
    with HubServer() as gone:  # the Hub of the download given up on: it hangs on files, then goes away
        patch_hf_env(monkeypatch, gone.url, tmp_path / "home-gone")
        monkeypatch.setenv("HF_TOKEN", gone.token)
        upload_prior(prior, "org/p")
        release = threading.Event()

        def hang_then_drop(method: str, path: str) -> None:
            if "/resolve/" in path:
                release.wait(60)
                raise ConnectionError("this Hub goes away")  # the connection is dropped: the worker retries

        gone.on_request = hang_then_drop
        short_limits(monkeypatch)
        with pytest.raises(PriorNotFoundError, match="stalled while downloading"):
            download_prior("org/p")  # given up on: its worker retries the files' metadata

        patch_hf_env(monkeypatch, healthy, tmp_path / "home-healthy")
        monkeypatch.setenv("PRIORZOO_HUB_STALL_WINDOW", "30")
        for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
            monkeypatch.setattr(constants, name, 10)
        closed: list[bool] = []
        first = threading.Lock()

        def close_the_client_under_the_first_file(method: str, path: str) -> None:
            if method == "GET" and "/resolve/" in path and first.acquire(blocking=False):
                client = get_session()  # the client this download reads from
                release.set()  # the gone Hub drops its connections ...
                threading.Thread(target=gone.close).start()  # ... and refuses new ones: the worker closes the client
                deadline = time.monotonic() + 30
                while not client.is_closed and time.monotonic() < deadline:
                    time.sleep(0.02)
                closed.append(client.is_closed)

        hub_server.on_request = close_the_client_under_the_first_file
        try:
            folder = download_prior("org/p")
        finally:
            hub_server.on_request = None
            release.set()
            join_abandoned(60)
    assert closed == [True]  # the client was closed while the download had a file request in flight
    assert PriorModel.from_pretrained(folder).scale == 4.0


def test_hub_limits_are_validated(hub_server: HubServer, monkeypatch) -> None:
    monkeypatch.setenv("PRIORZOO_HUB_MIN_RATE", "soon")
    with pytest.raises(ValueError, match=r"`PRIORZOO_HUB_MIN_RATE` must be a number > 0; received 'soon'"):
        download_prior("org/p")


# --------------------------------------------------------------------------------------------- huggingface_hub's own
_CHILD = textwrap.dedent(
    """
    import json, sys
    from huggingface_hub import get_session, set_client_factory
    from huggingface_hub.utils import _http
    import httpx2

    seen = []
    if sys.argv[1] == "user-factory":
        def factory():
            def record(request):
                seen.append([request.method, request.url.path, request.extensions.get("timeout", {}).get("read")])
            return httpx2.Client(event_hooks={"request": [record]}, follow_redirects=True, timeout=None)
        set_client_factory(factory)
    before = _http._GLOBAL_CLIENT_FACTORY  # read only: which factory huggingface_hub holds
    from priorzoo import PriorModel
    prior = PriorModel.from_pretrained("org/p", force_download=True)
    print(json.dumps({
        "scale": prior.scale,
        "seen": seen,
        "factory_unchanged": _http._GLOBAL_CLIENT_FACTORY is before,
        "default_factory": _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory,
    }))
    """
)


@pytest.mark.parametrize("mode", ["user-factory", "default-factory"])
def test_the_users_timeouts_and_client_factory_are_used_as_they_are(
    hub_server: HubServer, monkeypatch, tmp_path, mode: str
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    upload_prior(small(3.0).save_pretrained(tmp_path / "p"), "org/p")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_DOWNLOAD_TIMEOUT": "123", "HF_HUB_ETAG_TIMEOUT": "45"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scale"] == 3.0
    assert result["factory_unchanged"]
    if mode == "default-factory":
        assert result["default_factory"]
        return
    downloads = [(m, t) for m, path, t in result["seen"] if "/resolve/" in path]
    assert ("GET", 123) in downloads  # the file bodies: HF_HUB_DOWNLOAD_TIMEOUT as the user set it
    assert ("HEAD", 45) in downloads  # the metadata requests: HF_HUB_ETAG_TIMEOUT as the user set it
    assert {t for _, t in downloads} <= {123, 45}
