"""Bounded network waits for priorzoo's Hub operations: connect and read timeouts, a stall rule, a deadline.

huggingface_hub's client waits without a limit on most calls and retries timeouts five times with backoff,
so a Hub (or proxy) that accepts a connection and never answers, or drips a byte every few seconds, could
block :func:`priorzoo.hub.download_prior` for many minutes. Inside :func:`bounded` every socket operation of
huggingface_hub's shared client is limited:

- ``PRIORZOO_HUB_CONNECT_TIMEOUT`` (default 10 s): to open a connection;
- ``PRIORZOO_HUB_READ_TIMEOUT`` (default 30 s): the longest wait for the next bytes, and the window of the
  stall rule: an answer trickling in (under 1 KiB in that long, in 8 reads or more: a byte every 2 s)
  is given up;
- ``PRIORZOO_HUB_DEADLINE`` (default 600 s): the whole operation (all requests, and huggingface_hub's
  retries, which count against it: once it is spent no retry starts).

A limit that is hit raises :class:`HubTimeoutError` (an ``OSError``), which priorzoo turns into its one-line
"could not be reached" error. The limits apply to huggingface_hub's default client; a client factory of
your own (``huggingface_hub.set_client_factory``) is left as it is. Outside :func:`bounded` nothing changes.

Example:
    >>> limits_from_env({"PRIORZOO_HUB_DEADLINE": "5"}).deadline
    5.0
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["HubLimits", "HubTimeoutError", "bounded", "limits_from_env"]

_MIN_PROGRESS = 1024  # bytes per read window below which a connection counts as stalled ...
_MIN_READS = 8  # ... when they came in this many reads or more (a trickle, not one late answer)


class HubTimeoutError(TimeoutError):
    """A Hub request ran into one of the limits of :func:`bounded` (connect, read, stall or deadline)."""


@dataclass(frozen=True)
class HubLimits:
    """The limits of one priorzoo Hub operation, in seconds."""

    connect: float = 10.0
    read: float = 30.0
    deadline: float = 600.0

    def describe(self) -> str:
        return f"connect {self.connect:g} s, read {self.read:g} s, deadline {self.deadline:g} s"


_ENV = {
    "connect": "PRIORZOO_HUB_CONNECT_TIMEOUT",
    "read": "PRIORZOO_HUB_READ_TIMEOUT",
    "deadline": "PRIORZOO_HUB_DEADLINE",
}


def limits_from_env(environ: Mapping[str, str] | None = None) -> HubLimits:
    """The :class:`HubLimits` the ``PRIORZOO_HUB_*`` environment variables ask for (defaults otherwise)."""
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
        if not value > 0:
            raise ValueError(f"`{var}` must be a number of seconds > 0; received {text!r}")
        values[key] = value
    return HubLimits(**values)


class _Active:
    def __init__(self, limits: HubLimits) -> None:
        self.limits = limits
        self.end = time.monotonic() + limits.deadline

    def cap(self, timeout: float | None, limit: float, what: str) -> float:
        remaining = self.end - time.monotonic()
        if remaining <= 0:
            raise HubTimeoutError(
                f"no answer within the {self.limits.deadline:g} s deadline ({what}; limits: {self.limits.describe()})"
            )
        return min(t for t in (timeout, limit, remaining) if t is not None)


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("priorzoo_hub_limits", default=None)


class _Stream:
    """A network stream whose reads and writes obey the active limits."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._window_start = time.monotonic()
        self._window_bytes = self._window_reads = 0

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        active = _ACTIVE.get()
        if active is None:
            return self._inner.read(max_bytes, timeout)
        try:
            data = self._inner.read(max_bytes, active.cap(timeout, active.limits.read, "reading"))
        except HubTimeoutError:
            raise
        except Exception as err:  # the inner read timed out: say which limit
            if "timeout" in type(err).__name__.lower() or "timed out" in str(err):
                if active.end - time.monotonic() <= 0.01:
                    active.cap(None, active.limits.read, "reading")  # raises the deadline error
                raise HubTimeoutError(
                    f"no bytes for {active.limits.read:g} s (read timeout; limits: {active.limits.describe()})"
                ) from None
            raise
        now = time.monotonic()
        self._window_bytes += len(data)
        self._window_reads += 1
        if now - self._window_start >= active.limits.read:
            # trickling: many small reads adding up to little (one long wait is the read timeout's business)
            if self._window_bytes < _MIN_PROGRESS and self._window_reads >= _MIN_READS:
                raise HubTimeoutError(
                    f"stalled: {self._window_bytes} bytes in {now - self._window_start:.0f} s, under "
                    f"{_MIN_PROGRESS} bytes per {active.limits.read:g} s (limits: {active.limits.describe()})"
                )
            self._window_start, self._window_bytes, self._window_reads = now, 0, 0
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        active = _ACTIVE.get()
        if active is not None:
            timeout = active.cap(timeout, active.limits.read, "sending")
        self._inner.write(buffer, timeout)
        self._window_start = time.monotonic()  # a new request: its answer gets a fresh window
        self._window_bytes = self._window_reads = 0

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        active = _ACTIVE.get()
        if active is not None:
            timeout = active.cap(timeout, active.limits.connect, "TLS handshake")
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend:
    """httpcore's network backend, with :class:`_Stream` connections."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def _timeout(self, timeout: float | None) -> float | None:
        active = _ACTIVE.get()
        return timeout if active is None else active.cap(timeout, active.limits.connect, "connecting")

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
        timeout = self._timeout(timeout)
        try:
            return _Stream(self._inner.connect_tcp(host, port, timeout, *args, **kwargs))
        except Exception as err:
            active = _ACTIVE.get()
            if active is not None and "timeout" in type(err).__name__.lower():
                raise HubTimeoutError(
                    f"could not connect to {host}:{port} within {timeout:g} s (limits: {active.limits.describe()})"
                ) from None
            raise

    def connect_unix_socket(self, path: str, timeout: float | None = None, *args: Any, **kwargs: Any) -> Any:
        return _Stream(self._inner.connect_unix_socket(path, self._timeout(timeout), *args, **kwargs))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def _bounded_client() -> Any:
    """huggingface_hub's default client, its connections made through :class:`_Backend`."""
    from huggingface_hub.utils import _http

    client = _http.default_client_factory()
    transports = [getattr(client, "_transport", None), *getattr(client, "_mounts", {}).values()]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        inner = getattr(pool, "_network_backend", None)
        if inner is not None and not isinstance(inner, _Backend):
            pool._network_backend = _Backend(inner)
    return client


def _install() -> None:
    """Make huggingface_hub's shared client use :func:`_bounded_client` (once; never over a user's factory)."""
    try:
        from huggingface_hub.utils import _http
    except ImportError:  # pragma: no cover - an older huggingface_hub: its own limits apply
        return
    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if factory is _bounded_client:
        return
    if factory is getattr(_http, "default_client_factory", None):
        _http.set_client_factory(_bounded_client)


@contextlib.contextmanager
def bounded(limits: HubLimits | None = None) -> Iterator[HubLimits]:
    """Run the Hub requests inside the block under ``limits`` (default: :func:`limits_from_env`).

    Nested blocks share the outer block's deadline.
    """
    if _ACTIVE.get() is not None:
        yield _ACTIVE.get().limits  # type: ignore[union-attr]
        return
    limits = limits or limits_from_env()
    _install()
    token = _ACTIVE.set(_Active(limits))
    try:
        yield limits
    finally:
        _ACTIVE.reset(token)
