"""Replacing the prior in a folder as a whole: the target checks, the writers' lock, the commit point.

A save (:func:`replace_prior_files`) into a target folder:

1. refuses a target that is not a prior folder (:func:`check_target`: a non-empty folder without a priorzoo
   ``config.json``, a model folder) unless ``overwrite=True``;
2. takes the advisory lock ``.priorzoo-lock`` (``flock``; a second writer waits up to :data:`LOCK_TIMEOUT_S`,
   then gets a ``TimeoutError`` naming the folder) and removes leftovers of interrupted saves — only names of
   the fixed pattern ``.priorzoo-tmp-<16 hex>-<final name>``, only regular files or links (the link itself,
   never what it points to), never a directory;
3. writes every new file under such a temporary name (created exclusively, never through a link), fsyncs it;
4. renames the tensor files and the card into place, then ``config.json`` — the commit point, one rename;
5. removes tensor files of the old prior the new one does not have (say its shards after an unsharded save):
   only names of a prior's tensor files, only regular files, only when the folder held a prior before.

No name read from inside the folder decides what is written, moved or deleted: every name comes from the
writer or from the fixed patterns of :mod:`priorzoo.format.files`. A reader tells a complete prior from a mixture by
the save id every tensor file carries (see :mod:`priorzoo.format.serialization`): a ``kill -9`` between step 4's
first rename and its last leaves tensors of the new save under the old ``config.json``, which readers refuse
with :class:`~priorzoo.errors.MixedPriorError` (never a silent mixture); at any other moment the folder reads
as the old prior or the new one. The target path itself is the caller's: when it is a link, the folder it
leads to is written (once opened, everything happens relative to that open folder).

Example:
    >>> import tempfile
    >>> def write(staging):
    ...     staging.write_text("config.json", "{}")
    ...     staging.write_bytes("prior.safetensors", b"")
    >>> folder = replace_prior_files(tempfile.mkdtemp(), write, what="folder")
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'prior.safetensors']
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from priorzoo.errors import PriorFormatError, PriorTargetError
from priorzoo.format.config import REQUIRED_KEYS
from priorzoo.format.files import (
    CARD_NAME,
    CONFIG_NAME,
    INDEX_NAME,
    LOCK_NAME,
    SHARD_RE,
    TMP_PREFIX,
    TMP_RE,
    WEIGHTS_NAME,
    file_save_id,
    is_prior_file,
    is_prior_weights,
    read_json,
)
from priorzoo.format.tensorfile import write_tensor_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves into one folder are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_TIMEOUT_S", "Staging", "check_target", "replace_prior_files", "save_in_progress", "target_lock"]

LOCK_TIMEOUT_S = 600.0
"""How long a save waits for another save into the same folder to finish before giving up."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


# --------------------------------------------------------------------------------------------- the target
def _entries(path: Path) -> list[str]:
    """The folder's entries, less the lock and the leftovers of priorzoo saves (they do not make it non-empty)."""
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if n != LOCK_NAME and TMP_RE.fullmatch(n) is None)


def _holds_prior(path: Path) -> bool | None:
    """``True``: a priorzoo config; ``False``: a ``config.json`` of something else; ``None``: none there."""
    if not os.path.lexists(path / CONFIG_NAME):
        return None
    try:
        data = read_json(path / CONFIG_NAME)
    except (OSError, PriorFormatError):
        return False
    return isinstance(data, dict) and all(k in data for k in REQUIRED_KEYS)


def _was_prior(path: Path, what: str, overwrite: bool) -> bool:
    """Whether ``path`` holds a prior (its stale tensor files may then be removed); raise if it must not be
    written into."""
    entries = _entries(path)
    if not entries:
        return False
    holds = _holds_prior(path)
    if holds or overwrite:
        return bool(holds)
    if holds is False:
        raise PriorTargetError.refusing(
            what,
            str(path),
            f"holds a {CONFIG_NAME} that is not a priorzoo prior's (a prior's has {list(REQUIRED_KEYS)}), e.g. a "
            "model folder: refusing to replace its files",
        )
    shown = ", ".join(repr(n) for n in entries[:5]) + (f", … ({len(entries)} entries)" if len(entries) > 5 else "")
    raise PriorTargetError.refusing(
        what,
        str(path),
        f"is a non-empty folder that holds no prior (no {CONFIG_NAME}; it has {shown}): refusing to write a prior "
        f"into it, which would replace its {CARD_NAME} and tensor-named files",
    )


def check_target(target: str | os.PathLike, what: str, *, overwrite: bool = False) -> Path:
    """Refuse a target folder a prior must not be written into; return it as a ``Path``.

    Refused: an empty path (it would mean the current folder), a path that is a file, a folder whose
    ``config.json`` is not a priorzoo prior's (a model folder), and a non-empty folder without a prior (a
    project root, a folder of other files) — the last two unless ``overwrite=True``, with a
    :class:`~priorzoo.errors.PriorTargetError` (a ``FileExistsError``) whose remedy an application may reword.
    A new or empty folder, or one holding a prior (replaced as a whole), is accepted.

    Example:
        >>> check_target("", "save_directory")
        Traceback (most recent call last):
        ...
        ValueError: `save_directory` is empty: pass a folder path ('.' for the current folder)
    """
    if not isinstance(target, (str, os.PathLike)):
        raise TypeError(f"`{what}` must be a folder path; received {type(target).__name__}")
    if os.fspath(target) == "":
        raise ValueError(f"`{what}` is empty: pass a folder path ('.' for the current folder)")
    path = Path(target)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"`{what}` {str(path)!r} exists and is not a directory")
    _was_prior(path, what, overwrite)
    return path


# --------------------------------------------------------------------------------------------- the lock
@contextlib.contextmanager
def target_lock(dir_fd: int, where: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the advisory lock :data:`~priorzoo.format.files.LOCK_NAME` of the open folder ``dir_fd`` (waiting up to
    ``timeout`` seconds, default :data:`LOCK_TIMEOUT_S`, for another save to finish); the lock file is opened
    without following a link and removed when the lock is released."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout is None else timeout)
    while True:
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW, 0o666, dir_fd=dir_fd)
        except OSError as err:
            raise FileExistsError(
                f"{where}: cannot open its lock file `{LOCK_NAME}` ({err.strerror}): it is a link or a directory; "
                "remove it (nothing of the prior is in it) and save again"
            ) from None
        own = os.fstat(fd)
        if not stat.S_ISREG(own.st_mode):
            os.close(fd)
            raise FileExistsError(f"{where}: its lock `{LOCK_NAME}` is not a regular file; remove it and save again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"another process is saving a prior into {where} (it holds `{LOCK_NAME}`) and did not finish "
                    f"within {LOCK_TIMEOUT_S if timeout is None else timeout:g} s; wait for it, or stop it, and "
                    "save again"
                ) from None
            time.sleep(0.02)
            continue
        try:  # the file locked must still be the one named LOCK_NAME (a finishing save removes it)
            named = os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        if named is not None and (named.st_ino, named.st_dev) == (own.st_ino, own.st_dev):
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(LOCK_NAME, dir_fd=dir_fd)  # still ours: nobody else could lock it meanwhile
        os.close(fd)


def save_in_progress(folder: str | os.PathLike) -> bool:
    """Whether a priorzoo save into ``folder`` holds its lock now (readers then re-read a mixture).

    Example:
        >>> import tempfile
        >>> save_in_progress(tempfile.mkdtemp())
        False
    """
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(Path(folder) / LOCK_NAME, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


# --------------------------------------------------------------------------------------------- writing
class Staging:
    """Where a save writes its files: each final name ``name`` (``config.json``, ``README.md``, a tensor file)
    is written under ``.priorzoo-tmp-<token>-<name>`` inside the target, created exclusively (``O_EXCL``) and
    never through a link. ``staging / name`` creates the file (empty) and returns its path, for writers that
    need one; the ``write_*`` methods write it whole. Picklable (a process that receives it finds the files the
    sender created).

    Example:
        >>> import tempfile
        >>> s = Staging(Path(tempfile.mkdtemp()))
        >>> (s / "config.json").name.endswith("-config.json"), s.names
        (True, ['config.json'])
    """

    def __init__(self, target: Path, dir_fd: int | None = None) -> None:
        self.target = Path(target)
        self.token = secrets.token_hex(8)
        self.names: list[str] = []
        self._dir_fd = dir_fd

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dir_fd": None}

    def temp_name(self, name: str) -> str:
        """The temporary name of the final file ``name``."""
        return f"{TMP_PREFIX}{self.token}-{name}"

    def create(self, name: str) -> int:
        """Create the temporary file of ``name``; return a descriptor open for writing (the caller closes it)."""
        if not is_prior_file(name):
            raise ValueError(f"a prior folder holds no file named {name!r}: a save writes only a prior's files")
        if name in self.names:
            raise ValueError(f"`{name}` was already written by this save")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
        tmp = self.temp_name(name)
        fd = os.open(tmp if self._dir_fd is not None else self.target / tmp, flags, 0o666, dir_fd=self._dir_fd)
        self.names.append(name)
        return fd

    def __truediv__(self, name: str) -> Path:
        if name not in self.names:
            os.close(self.create(name))
        return self.target / self.temp_name(name)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the final file ``name`` with ``data``."""
        fd = self.create(name)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def write_text(self, name: str, text: str) -> None:
        """Write the final file ``name`` with ``text`` (UTF-8)."""
        self.write_bytes(name, text.encode("utf-8"))

    def write_tensors(self, name: str, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
        """Write the safetensors file ``name`` (:func:`priorzoo.format.tensorfile.write_tensor_file`)."""
        fd = self.create(name)
        try:
            write_tensor_file(fd, tensors, metadata)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Remove the temporary files still there (the link itself if one was put in their place)."""
        for name in self.names:
            tmp = self.temp_name(name)
            with contextlib.suppress(OSError):
                if self._dir_fd is not None:
                    os.unlink(tmp, dir_fd=self._dir_fd)
                else:
                    os.unlink(self.target / tmp)


def _remove_leftovers(dir_fd: int) -> None:
    """Remove the temporary files of interrupted saves (the fixed pattern; regular files and links only)."""
    for name in os.listdir(dir_fd):
        if TMP_RE.fullmatch(name) is None:
            continue
        with contextlib.suppress(OSError):
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                os.unlink(name, dir_fd=dir_fd)


def _check_staged(dir_fd: int, staging: Staging, where: str) -> None:
    """Before the commit: a complete prior, one save id throughout, and no directory in the way of a name."""
    names = staging.names
    if CONFIG_NAME not in names or not (WEIGHTS_NAME in names or INDEX_NAME in names):
        raise RuntimeError(f"a save into {where} wrote {names}: a prior needs {CONFIG_NAME} and its tensors")
    for name in names:
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise FileExistsError(
                f"{where}: `{name}` is a directory or special file: refusing to replace it by the prior's file"
            )
    root = [Path(os.path.realpath(staging.target))]
    config = read_json(staging.target / staging.temp_name(CONFIG_NAME), roots=root)
    save_id = config.get("save_id") if isinstance(config, dict) else None
    if save_id is None:
        return
    for name in names:
        if is_prior_weights(name) and name != INDEX_NAME:
            got = file_save_id(staging.target / staging.temp_name(name), roots=root)
            if got != save_id:
                raise RuntimeError(f"a save into {where} wrote `{name}` with save id {got!r}, its config {save_id!r}")


def _commit(dir_fd: int, staging: Staging, was_prior: bool, where: str) -> None:
    _check_staged(dir_fd, staging, where)
    names = staging.names
    for name in names:
        fd = os.open(staging.temp_name(name), os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    first = sorted(n for n in names if SHARD_RE.fullmatch(n)) + [
        n for n in (INDEX_NAME, WEIGHTS_NAME, CARD_NAME) if n in names
    ]
    for name in [*first, CONFIG_NAME]:  # config.json last: the commit point
        os.replace(staging.temp_name(name), name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
    if not was_prior:
        return
    for name in os.listdir(dir_fd):  # the old prior's tensor files the new one does not have
        if is_prior_weights(name) and name not in names:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=dir_fd)


def replace_prior_files(
    target: str | os.PathLike, write: Callable[[Staging], None], *, what: str, overwrite: bool = False
) -> Path:
    """Replace the prior in ``target`` (created if needed) by the files ``write(staging)`` writes, as a whole.

    ``write`` writes each file of the new prior through ``staging`` (a :class:`Staging`: ``staging / name``
    or ``staging.write_*``); then the files are committed as the module docstring says. ``what`` names the
    target in messages; ``overwrite`` allows a non-empty folder that holds no prior (see :func:`check_target`).
    Files get the mode of a newly created file (the umask).

    Raises:
        FileExistsError: a target that is not a prior folder (without ``overwrite``), or a directory, link or
            special file where the lock or one of the prior's files goes.
        TimeoutError: another save into the folder did not finish within :data:`LOCK_TIMEOUT_S`.
    """
    path = check_target(target, what, overwrite=overwrite)
    path.mkdir(parents=True, exist_ok=True)
    where = repr(str(path))
    dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        with target_lock(dir_fd, where):
            was_prior = _was_prior(path, what, overwrite)  # again, now that no other save runs
            _remove_leftovers(dir_fd)
            staging = Staging(path, dir_fd)
            try:
                write(staging)
                _commit(dir_fd, staging, was_prior, where)
            except BaseException:
                staging.discard()
                raise
    finally:
        os.close(dir_fd)
    return path
