"""What huggingface_hub's own timeouts and retries bound, against a silent and a dripping server on 127.0.0.1.

Each case starts a raw TCP server that misbehaves in one way and times one huggingface_hub call against it
(default ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` = 10 s unless set in the environment), with a
cap: a call still running at the cap is reported as "> cap" (unbounded by huggingface_hub's own limits).
All cases run at once, each in its own thread and cache, so the whole script takes about the cap.

- ``silent``: accepts the connection, reads the request, never answers.
- ``drip-headers``: sends ``HTTP/1.1 200 OK`` then one byte of a header every ``--drip`` seconds, for ever.
- ``drip-body``: answers the metadata HEAD at once (ETag, X-Repo-Commit, Content-Length: 1 MB) and the GET's
  headers at once, then one byte of the body every ``--drip`` seconds.

Then the same cases through :func:`priorzoo.hub.download_prior`, whose stall rule and deadline are set
short here (``PRIORZOO_HUB_STALL_WINDOW``/``PRIORZOO_HUB_MIN_RATE``/``PRIORZOO_HUB_DEADLINE``).

Example:
    $ OMP_NUM_THREADS=1 python benchmarks/bench_hub_timeouts.py --cap 240 --drip 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class MisbehavingServer:
    """A raw TCP server on 127.0.0.1 with one of the modes of the module docstring."""

    def __init__(self, mode: str, drip: float) -> None:
        self.mode, self.drip = mode, drip
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            request = conn.recv(65536).decode("latin-1")
            self.requests += 1
            method = request.split(" ", 1)[0]
            if self.mode == "silent":
                self.stop.wait()
                return
            if self.mode == "drip-headers":
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: ")
                while not self.stop.wait(self.drip):
                    conn.sendall(b"x")
                return
            size = 1_000_000
            head = (
                "HTTP/1.1 200 OK\r\n"
                f"Content-Length: {size}\r\nContent-Type: application/octet-stream\r\n"
                f'ETag: "{"e" * 40}"\r\nX-Repo-Commit: {"c" * 40}\r\nConnection: close\r\n\r\n'
            )
            conn.sendall(head.encode())
            if method == "HEAD":
                return
            while not self.stop.wait(self.drip):
                conn.sendall(b"x")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _timed(fn, cap: float) -> dict:
    out: dict = {}

    def run() -> None:
        start = time.monotonic()
        try:
            fn()
            out["result"] = "returned"
        except BaseException as err:  # we report what ended the call
            out["result"] = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        out["seconds"] = round(time.monotonic() - start, 1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(cap)
    if thread.is_alive():
        return {"seconds": None, "result": f"still running at the {cap:g} s cap"}
    return out


def _file_drip(home: Path, drip: float, cap: float) -> dict:
    """``download_prior`` against the tests' Hub server whose ``GET …/resolve/…`` bodies drip."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from hub_server import HubServer
    from huggingface_hub import constants as c

    from priorzoo import PriorModel
    from priorzoo.hub import download_prior, upload_prior

    with HubServer() as server:
        c.ENDPOINT = server.url
        c.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        prior = PriorModel.from_tensors({"w": torch.zeros(64, 64)}, variance=1.0)
        upload_prior(prior.save_pretrained(home / "prior"), "org/p", token=server.token)
        server.drip = drip
        return _timed(lambda: download_prior("org/p", cache_dir=home / "pz-file-drip"), cap)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=240.0, help="give up timing a call after this many seconds")
    parser.add_argument("--drip", type=float, default=5.0, help="seconds between two dripped bytes")
    parser.add_argument("--skip-priorzoo", action="store_true", help="time huggingface_hub's own calls only")
    parser.add_argument("--out", default="hub_timeouts", help="results/<out>.{json,md}")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    os.environ.setdefault("PRIORZOO_HUB_STALL_WINDOW", "20")
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    from priorzoo.hub import download_prior

    servers = {mode: MisbehavingServer(mode, args.drip) for mode in ("silent", "drip-headers", "drip-body")}
    cases = {}
    home = Path(tempfile.mkdtemp(prefix="bench-hub-timeouts-"))
    for mode, server in servers.items():
        cache = home / mode

        def model_info(url: str = server.url) -> None:
            HfApi(endpoint=url).model_info("org/p", timeout=constants.HF_HUB_ETAG_TIMEOUT)

        def model_info_default(url: str = server.url) -> None:
            HfApi(endpoint=url).model_info("org/p")

        def download(url: str = server.url, cache: Path = cache) -> None:
            hf_hub_download("org/p", "config.json", endpoint=url, cache_dir=cache / "hf")

        cases[f"HfApi.model_info(timeout=HF_HUB_ETAG_TIMEOUT) / {mode}"] = model_info
        cases[f"HfApi.model_info() (no timeout) / {mode}"] = model_info_default

        def snapshot(url: str = server.url, cache: Path = cache) -> None:
            snapshot_download("org/p", allow_patterns=["config.json"], endpoint=url, cache_dir=cache / "snap")

        cases[f"hf_hub_download / {mode}"] = download
        cases[f"snapshot_download / {mode}"] = snapshot

    results: dict[str, dict] = {}
    threads = []

    def run_case(name: str, fn) -> None:
        results[name] = _timed(fn, args.cap)

    for name, fn in cases.items():
        threads.append(threading.Thread(target=run_case, args=(name, fn), daemon=True))
    for t in threads:
        t.start()

    # priorzoo's own download, one server at a time (HF_ENDPOINT is process-wide in huggingface_hub)
    priorzoo_results = {}
    from huggingface_hub import constants as c

    for mode, server in servers.items() if not args.skip_priorzoo else ():
        c.ENDPOINT = server.url
        c.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        priorzoo_results[f"priorzoo.hub.download_prior / {mode}"] = _timed(
            lambda mode=mode: download_prior("org/p", cache_dir=home / f"pz-{mode}"), args.cap
        )
    if not args.skip_priorzoo:  # a real Hub protocol whose file bodies drip: priorzoo's stall rule on a file
        priorzoo_results["priorzoo.hub.download_prior / file bodies drip (tests/hub_server.py)"] = _file_drip(
            home, args.drip, args.cap
        )
    for t in threads:
        t.join()
    results.update(priorzoo_results)
    for server in servers.values():
        server.close()

    env = {k: os.environ.get(k) for k in sorted(os.environ) if k.startswith(("HF_HUB_", "PRIORZOO_HUB_"))}
    record = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), {platform.python_version()}",
        "huggingface_hub": __import__("huggingface_hub").__version__,
        "environment": env,
        "etag_timeout": constants.HF_HUB_ETAG_TIMEOUT,
        "download_timeout": constants.HF_HUB_DOWNLOAD_TIMEOUT,
        "drip_seconds": args.drip,
        "cap_seconds": args.cap,
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# What bounds a Hub call against a misbehaving server (127.0.0.1)",
        "",
        f"Command: `{record['command']}`  ",
        f"huggingface_hub {record['huggingface_hub']}; HF_HUB_ETAG_TIMEOUT = {record['etag_timeout']} s, "
        f"HF_HUB_DOWNLOAD_TIMEOUT = {record['download_timeout']} s; drip: 1 byte every {args.drip:g} s; "
        f"cap {args.cap:g} s; environment {env}.",
        "",
        "| call / server | seconds | how it ended |",
        "|---|---|---|",
    ]
    for name, r in results.items():
        secs = "-" if r["seconds"] is None else f"{r['seconds']:g}"
        lines.append(f"| {name} | {secs} | {r['result'].replace('|', '/')} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
