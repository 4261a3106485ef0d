"""What publishable provenance may say about local files: their names and digests, never their paths.

A prior's ``config.json``, its model card and its safetensors metadata are published (``push``, a tarball,
a git repository). A local absolute path in them (``/home/alice/ckpt/weights.pth``) tells the world a user
name and a folder layout, and means nothing on another machine. So:

- a local weights file is recorded by :func:`file_record`: its file name and the sha256 of its bytes
  (``{"file": "weights.pth", "sha256": "…"}``), which identify the weights anywhere;
- a name that may be a local folder or a Hub id / model name goes through :func:`public_name`: a local
  path becomes its last component (recorded with ``"local": true``, so that no card takes it for a Hub
  id), anything else stays as it is;
- :func:`strip_local_paths` is the safety net :class:`~priorzoo.config.PriorConfig` applies to its
  ``backbone``, ``source``, ``learning`` and ``results``: every string that is an absolute path
  (POSIX, ``~``, Windows) becomes its last component, and a path of two or more components written inside
  a longer text (or a ``file://`` URL) is replaced by its last component the same way.

Example:
    >>> public_name("/home/alice/models/tiny-bert"), public_name("bert-base-uncased")
    ('tiny-bert', 'bert-base-uncased')
    >>> strip_local_paths({"notes": "trained from /home/alice/data/train.csv", "hub_id": "org/name"})
    {'notes': 'trained from train.csv', 'hub_id': 'org/name'}
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

__all__ = ["file_record", "file_sha256", "is_local_path", "names_local_file", "public_name", "strip_local_paths"]

_WINDOWS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_SEGMENT = r"[^\s/\\\"'`<>|,;()\[\]{}]+"
# a path inside a longer text: `file://…`, `~/a…` or `/a/b…` (two or more components), not preceded by what
# makes it part of a URL, a Hub id or a relative path (`https://x/y`, `org/name`, `a/b/c`)
_EMBEDDED = re.compile(
    rf"(?:file://)?(?:(?<![\w.~/:\\-])~(?:/{_SEGMENT})+/?|(?<![\w.~/:\\-])/{_SEGMENT}(?:/{_SEGMENT})+/?)"
)


def is_local_path(value: str) -> bool:
    """Whether a string is an absolute local path: ``/…``, ``~…``, ``C:\\…``, ``\\\\server\\…``, ``file://…``.

    Example:
        >>> [is_local_path(v) for v in ("/tmp/x", "~/x", "C:\\\\x", "org/name", "resnet18")]
        [True, True, True, False, False]
    """
    return value.startswith(("/", "~", "file://")) or bool(_WINDOWS.match(value))


def _last_component(value: str) -> str:
    value = value.removeprefix("file://")
    pure = PureWindowsPath(value) if _WINDOWS.match(value) else PurePosixPath(value)
    return pure.name


def names_local_file(value: str | os.PathLike) -> bool:
    """Whether a name refers to something on this machine: an absolute path, or a path that exists here.

    Example:
        >>> names_local_file("/tmp"), names_local_file("org/name-that-is-no-folder-here")
        (True, False)
    """
    text = os.fspath(value)
    return is_local_path(text) or bool(text and Path(text).exists())


def public_name(value: str | os.PathLike) -> str:
    """A name fit to publish: a local path (absolute, or one that exists here) becomes its last component
    (``.`` the current folder's name); a Hub id or a model name is returned unchanged.

    Example:
        >>> public_name("~/priors/resnet-prior"), public_name("timm/resnet50.a1_in1k")
        ('resnet-prior', 'timm/resnet50.a1_in1k')
    """
    text = os.fspath(value)
    if is_local_path(text):
        return _last_component(text)
    if text and Path(text).exists():
        return Path(text).resolve().name
    return text


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (constant memory).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.bin")
        >>> _ = open(path, "wb").write(b"abc")
        >>> file_sha256(path)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """How a local weights file is recorded in published provenance: ``{"file": name, "sha256": hex}``.

    Raises:
        FileNotFoundError: no file at ``path``.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "weights.pth")
        >>> _ = open(path, "wb").write(b"abc")
        >>> record = file_record(path)
        >>> record["file"], record["sha256"][:8]
        ('weights.pth', 'ba7816bf')
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no file at {str(path)!r} to record")
    return {"file": file.name, "sha256": file_sha256(file)}


def strip_local_paths(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every local path reduced to its last
    component: whole strings that are absolute paths, and paths of 2+ components inside longer strings.

    Example:
        >>> strip_local_paths(["/tmp/run/ckpt", "C:\\\\Users\\\\al\\\\w.pth", "https://hf.co/a/b", 3])
        ['ckpt', 'w.pth', 'https://hf.co/a/b', 3]
    """
    if isinstance(value, str):
        if is_local_path(value.strip()):
            return _last_component(value.strip())
        return _EMBEDDED.sub(lambda m: _last_component(m.group(0).rstrip("/")), value)
    if isinstance(value, dict):
        return {k: strip_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(strip_local_paths(v) for v in value)
    return value
