r"""A bounded wait for priorzoo's own Hub calls: a stall rule on the average rate, and an optional deadline.

What huggingface_hub already bounds (measured against servers on 127.0.0.1, ``benchmarks/results/
hub_timeouts_hf_only.md``): every read of a file request waits at most ``HF_HUB_ETAG_TIMEOUT`` (metadata
HEAD) or ``HF_HUB_DOWNLOAD_TIMEOUT`` (GET) seconds, 10 s each by default, and a request that times out is
retried (five times, with 1-8 s pauses), so a server that *never answers* ends a download in about a minute.
A server that *drips* a byte now and then passes every per-read timeout: one byte every 5 s holds a
download for as long as the server keeps it up. ``HfApi`` calls such as ``model_info`` take no timeout at
all unless given one (priorzoo passes ``HF_HUB_ETAG_TIMEOUT``). The user's ``HF_HUB_*`` values are used as
they are; nothing here changes huggingface_hub's client or any process-wide setting.

priorzoo adds one rule on top, for its own downloads only. The call runs in a worker thread; the caller
watches its progress as huggingface_hub reports it through the public ``tqdm_class`` parameter (its bars are
updated every ``huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE`` bytes = 10 MiB of a file, and when a file
ends) and through the worker's own steps (a request about to be sent). Between two progress events at most
:math:`E` bytes can arrive unseen (what the bars still expect, at most one chunk per parallel download;
:math:`E = 0` while metadata is awaited), so when

.. math::  t - t_{\text{last}} > W \quad\text{and}\quad \frac{E}{t - t_{\text{last}}} < r_{\min}

the average rate over the last :math:`t - t_{\text{last}} > W` seconds is provably below the floor
:math:`r_{\min}`, and the call is given up with :class:`HubTimeoutError`. The rule bounds the average rate
over a window, not the gap between two bytes: a byte every 5 s on a 2 KB ``config.json`` ends after
:math:`W` seconds; on a 10 MiB chunk after :math:`W + E/r_{\min}`. An abandoned worker stops at its next
progress report; until then it runs on in huggingface_hub: a request it is blocked in ends with huggingface_hub's
own timeouts (or, for a dripping server, when the server closes), and huggingface_hub's own retries (a file's
metadata, paginated listings) still send requests.

Such a retry that cannot connect makes huggingface_hub close its **shared** HTTP client (``close_session``, on a
``ConnectError``): a request another thread has in flight on that client then fails (``ReadError: Bad file
descriptor``, measured with huggingface_hub 2.4). huggingface_hub has no public way to give one call its own client
or to keep a thread from closing the shared one, so priorzoo protects its own later calls instead: while a worker
it gave up on is still running, a later bounded call whose client was closed under it (that client is closed, and a
read/write error of the HTTP client or a "client has been closed" error is in the failure's chain) is run again, up
to :data:`CLOSED_CLIENT_RETRIES` times (the files it already fetched stay in the cache), still under the same
limits. Other code's calls in the process (say transformers' ``from_pretrained``) can still fail that way while such
a worker runs.

- ``PRIORZOO_HUB_STALL_WINDOW`` :math:`W` (default 30 s), never shorter than the user's ``HF_HUB_ETAG_TIMEOUT``
  and ``HF_HUB_DOWNLOAD_TIMEOUT``: a wait that huggingface_hub allows for one read is never cut short;
- ``PRIORZOO_HUB_MIN_RATE`` :math:`r_{\min}` in bytes per second (default 51200: 50 KiB/s);
- ``PRIORZOO_HUB_DEADLINE`` (default none): an overall limit on one priorzoo Hub operation.

Example:
    >>> limits_from_env({"PRIORZOO_HUB_STALL_WINDOW": "5"}).window
    5.0
    >>> run_bounded(lambda progress: 42, HubLimits(window=1.0), what="a quick call")
    42
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["CLOSED_CLIENT_RETRIES", "HubLimits", "HubTimeoutError", "Progress", "limits_from_env", "run_bounded"]

T = TypeVar("T")


class HubTimeoutError(TimeoutError):
    """A priorzoo Hub operation was given up: its average rate fell below the floor, or its deadline passed."""


@dataclass(frozen=True)
class HubLimits:
    """The limits of one priorzoo Hub operation: stall window (s), minimum rate (bytes/s), deadline (s or None)."""

    window: float = 30.0
    min_rate: float = 51200.0
    deadline: float | None = None

    def describe(self) -> str:
        text = f"stall window {self.window:g} s, minimum rate {self.min_rate:g} B/s"
        return text + (f", deadline {self.deadline:g} s" if self.deadline is not None else "")


_ENV = {"window": "PRIORZOO_HUB_STALL_WINDOW", "min_rate": "PRIORZOO_HUB_MIN_RATE", "deadline": "PRIORZOO_HUB_DEADLINE"}


def limits_from_env(environ: Mapping[str, str] | None = None) -> HubLimits:
    """The :class:`HubLimits` that the ``PRIORZOO_HUB_*`` variables ask for (defaults for the others).

    Example:
        >>> limits_from_env({"PRIORZOO_HUB_MIN_RATE": "0"})
        Traceback (most recent call last):
        ...
        ValueError: `PRIORZOO_HUB_MIN_RATE` must be a number > 0; received '0'
    """
    environ = os.environ if environ is None else environ
    values: dict[str, float] = {}
    for key, var in _ENV.items():
        text = environ.get(var)
        if text is None or text == "":
            continue
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise ValueError(f"`{var}` must be a number > 0; received {text!r}")
        values[key] = value
    return HubLimits(**values)


class Progress:
    """What a worker reports to its watcher: the step it is in, and the progress bars huggingface_hub drives.

    ``tqdm_class`` is a progress-bar class for huggingface_hub's public ``tqdm_class`` parameter: it shows
    huggingface_hub's usual bar, reports each update here, and lets the watcher read how many bytes the bar
    still expects; once the watcher gave up, its next update raises.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()  # a bar's close() may run from tqdm's __del__ while it is held
        self.last = time.monotonic()
        self.step = "starting"
        self.next_step: str | None = None
        self.bars: list[Any] = []
        self.cancelled = threading.Event()
        self.tqdm_class = _progress_bar_class(self)

    def event(self) -> None:
        """Something arrived (a response, a chunk, a finished file): the quiet time starts again."""
        if self.cancelled.is_set():
            raise HubTimeoutError(f"given up while {self.step} (the watcher stopped waiting)")
        with self._lock:
            self.last = time.monotonic()

    def begin(self, step: str, *, then: str | None = None) -> None:
        """A new step (a request about to be sent); ``then`` names the step once bytes start to arrive."""
        self.step, self.next_step = step, then
        self.event()

    def unseen(self) -> int:
        """At most how many bytes can arrive before the next report: what the byte bars still expect, capped
        at one chunk of huggingface_hub per parallel download (0 while no body is being read)."""
        from huggingface_hub import constants

        with self._lock:
            bars = list(self.bars)
        due = [max(int((b.total or 0) - b.n), 0) for b in bars if getattr(b, "unit", "") == "B"]
        return min(max(due, default=0), _PARALLEL * constants.DOWNLOAD_CHUNK_SIZE)

    def stalled(self, limits: HubLimits) -> str | None:
        """Why the worker counts as stalled now (the rule of the module docstring), else ``None``."""
        unseen = self.unseen()
        with self._lock:
            quiet = time.monotonic() - self.last
        if quiet > limits.window and unseen / quiet < limits.min_rate:
            return (
                f"stalled while {self.step}: under {limits.min_rate:g} bytes/s over the last {quiet:.0f} s "
                f"(at most {unseen} bytes arrived unseen)"
            )
        return None


_PARALLEL = 8  # snapshot_download's default max_workers: files downloaded at once


def _progress_bar_class(progress: Progress) -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Watched(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            with progress._lock:
                progress.bars.append(self)
            if progress.next_step is not None:
                progress.step, progress.next_step = progress.next_step, None
            progress.event()

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            progress.event()
            return out

        def close(self) -> None:
            with progress._lock:
                if self in progress.bars:
                    progress.bars.remove(self)
            super().close()

    return _Watched


def _shared_client() -> Any:
    """huggingface_hub's shared HTTP client (its public ``get_session``: created by the user's factory if none yet)."""
    from huggingface_hub import get_session

    return get_session()


def _no_shorter_than_hf_timeouts(limits: HubLimits) -> HubLimits:
    """``limits`` with a window at least the user's ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT``."""
    from huggingface_hub import constants

    longest = max(float(constants.HF_HUB_ETAG_TIMEOUT), float(constants.HF_HUB_DOWNLOAD_TIMEOUT))
    return limits if limits.window >= longest else dataclasses.replace(limits, window=longest)


CLOSED_CLIENT_RETRIES = 8
"""How many times a bounded call is run again when huggingface_hub's shared client was closed under it while a
worker priorzoo gave up on was still running (module docstring)."""

_abandoned: list[threading.Thread] = []  # workers given up on; pruned as they end
_abandoned_lock = threading.Lock()


def _abandoned_running() -> bool:
    with _abandoned_lock:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        return bool(_abandoned)


def _closed_client_errors() -> tuple[type[BaseException], ...]:
    """What a request fails with when its client is closed under it: a read/write/close error of the HTTP client
    huggingface_hub uses (httpx2 or httpx), or the client's ``RuntimeError`` for a request sent on a closed client."""
    import importlib

    found: list[type[BaseException]] = [RuntimeError]
    for module in ("httpx2", "httpx"):
        for name in ("ReadError", "WriteError", "CloseError"):
            with contextlib.suppress(ImportError, AttributeError):
                found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def _hit_by_a_closed_client(err: BaseException, client: Any) -> bool:
    """Whether ``err`` can come from huggingface_hub's shared client closed under the call: ``client`` (the shared
    client when the call started) is closed now, and an error of :func:`_closed_client_errors` is in the chain."""
    if client is None or not getattr(client, "is_closed", False):
        return False
    kinds = _closed_client_errors()
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return True
        todo += [e.__cause__, e.__context__]
    return False


def run_bounded(fn: Callable[[Progress], T], limits: HubLimits | None = None, *, what: str, poll: float = 0.25) -> T:
    """Run ``fn(progress)`` in a worker thread and return its result, giving up by the rule of the module.

    ``fn`` calls ``progress.begin(step)`` before each request and passes ``progress.tqdm_class`` to
    huggingface_hub's downloads. Exceptions of ``fn`` are raised here.

    Raises:
        HubTimeoutError: the worker stalled (its average rate over more than the window fell below the
            floor) or the deadline passed; the message names the step, the limits, and how to change them.
    """
    limits = _no_shorter_than_hf_timeouts(limits or limits_from_env())
    progress = Progress()
    box: dict[str, Any] = {}

    def work() -> None:
        for attempt in range(CLOSED_CLIENT_RETRIES + 1):
            # the shared client, looked at only while a worker given up on runs (it may close it under this call)
            client = _shared_client() if _abandoned_running() else None
            try:
                box["value"] = fn(progress)
                return
            except BaseException as err:  # handed to the caller, or run again (module docstring)
                again = attempt < CLOSED_CLIENT_RETRIES and not progress.cancelled.is_set()
                if again and _hit_by_a_closed_client(err, client):
                    with contextlib.suppress(HubTimeoutError):  # the watcher may have given up meanwhile
                        progress.begin("starting again (huggingface_hub's shared client was closed under the call)")
                        continue
                box["error"] = err
                return

    worker = threading.Thread(target=work, name=f"priorzoo-hub: {what}", daemon=True)
    start = time.monotonic()
    worker.start()
    while True:
        worker.join(poll)
        if not worker.is_alive():
            break
        why = progress.stalled(limits)
        if why is None and limits.deadline is not None and time.monotonic() - start > limits.deadline:
            why = f"not done within the {limits.deadline:g} s deadline (while {progress.step})"
        if why is not None:
            progress.cancelled.set()
            with _abandoned_lock:
                _abandoned.append(worker)
            raise HubTimeoutError(
                f"{what}: {why}; limits: {limits.describe()} (PRIORZOO_HUB_STALL_WINDOW, PRIORZOO_HUB_MIN_RATE, "
                "PRIORZOO_HUB_DEADLINE)"
            )
    if "error" in box:
        raise box["error"]
    return box["value"]
