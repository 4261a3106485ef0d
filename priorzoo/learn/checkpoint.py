"""Checkpoint files of the learners (SWAG resume state, ``swag_fit`` checkpoints): tensors in safetensors plus one
JSON document in its header, written atomically, never pickle; optimizer and RNG state travel as a tensor tree.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> tensors = {}
    >>> tree = flatten_tree({"step": 3, "state": {0: {"exp_avg": torch.ones(2)}}}, "opt.", tensors)
    >>> path = atomic_save_safetensors(tensors, Path(tempfile.mkdtemp()) / "ckpt.safetensors", {"tree": tree})
    >>> loaded, meta = load_safetensors_with_meta(path, what="checkpoint")
    >>> unflatten_tree(meta["tree"], loaded)["state"][0]["exp_avg"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_save_file",
    "atomic_save_safetensors",
    "flatten_tree",
    "load_safetensors_with_meta",
    "unflatten_tree",
]


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """safetensors' ``save_file(tensors, path, metadata)``, atomically; returns ``path``.

    The file is written to a fresh temporary name next to its destination and moved in with ``os.replace``: an
    interrupted save leaves the previous file intact, and a reader (or another process writing the same content to
    the same path) never sees a partial file.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from safetensors import safe_open
        >>> path = atomic_save_file({"x": torch.ones(2)}, Path(tempfile.mkdtemp()) / "a.safetensors", {"k": "v"})
        >>> with safe_open(str(path), framework="pt") as f:
        ...     f.metadata()["k"], f.get_tensor("x").tolist()
        ('v', [1.0, 1.0])
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` plus a JSON document (under header key ``priorzoo``) to ``path`` atomically.

    Written by :func:`atomic_save_file`: an interrupted save leaves the previous checkpoint intact.
    """
    return atomic_save_file(tensors, path, {"format": "pt", "priorzoo": json.dumps(meta, sort_keys=True)})


def load_safetensors_with_meta(path: str | os.PathLike, *, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`atomic_save_safetensors`: ``(tensors, json document)``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors {what} ({err})") from None
    if "priorzoo" not in header:
        raise ValueError(f"{path}: a safetensors file, but not a priorzoo {what} (no `priorzoo` header entry)")
    try:
        meta = json.loads(header["priorzoo"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: corrupt `priorzoo` header entry ({err})") from None
    return tensors, meta


def flatten_tree(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"__tensor__": key}``, storing it in ``tensors``.

    Used to write optimizer and RNG state into safetensors + JSON (never pickle).
    """
    if isinstance(tree, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = tree
        return {"__tensor__": key}
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out[str(k)] = flatten_tree(v, f"{prefix}{k}.", tensors)
        if any(not isinstance(k, str) for k in tree):
            out["__int_keys__"] = True
        return out
    if isinstance(tree, (list, tuple)):
        return {
            "__list__": [flatten_tree(v, f"{prefix}{i}.", tensors) for i, v in enumerate(tree)],
            "__tuple__": isinstance(tree, tuple),
        }
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} at `{prefix.rstrip('.')}` in a checkpoint")


def unflatten_tree(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_tree`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__list__" in tree:
            items = [unflatten_tree(v, tensors) for v in tree["__list__"]]
            return tuple(items) if tree.get("__tuple__") else items
        int_keys = tree.get("__int_keys__", False)
        return {(int(k) if int_keys else k): unflatten_tree(v, tensors) for k, v in tree.items() if k != "__int_keys__"}
    return tree
