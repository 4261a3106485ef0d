"""safetensors files read through one open file and written through one new file, with their headers checked.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian N, then N bytes of JSON header —
``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, …}`` — then the data,
each tensor row-major at ``8 + N + begin``. :class:`TensorFile` maps one open descriptor, so the header it
checked and every tensor it reads come from the same file even if the name is replaced meanwhile (a save
landing); :meth:`TensorFile.read` reads a whole tensor or only the pages of a slice. :func:`write_tensor_file`
writes a canonical file (header keys sorted, tensors by decreasing alignment then name), so the same tensors
and metadata always give the same bytes.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    >>> write_tensor_file(fd, {"x": torch.arange(6.0).reshape(3, 2)}, {"format": "pt"})
    >>> os.close(fd)
    >>> with TensorFile(os.open(path, os.O_RDONLY), "t.safetensors") as f:
    ...     f.metadata, f.read("x", (slice(1, 2),)).tolist()
    ({'format': 'pt'}, [[2.0, 3.0]])
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from priorzoo.errors import PriorFormatError

__all__ = ["DTYPES", "ST_NAMES", "TensorFile", "header_bytes", "write_tensor_file"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
"""safetensors dtype codes this reader knows (a file may hold more; the prior checks allow fewer)."""
ST_NAMES = {v: k for k, v in DTYPES.items()}
"""torch dtype → safetensors code."""
_MAX_HEADER = 100_000_000


class TensorFile(Mapping[str, Tensor]):
    """The header and tensors of one safetensors file, read from ``fd`` (which this object takes over: it maps
    the file and closes ``fd``); as a mapping, ``file[name]`` reads tensor ``name`` whole.

    Attributes:
        metadata: the header's ``__metadata__`` (string values only), ``{}`` when absent.
        entries: ``name -> (dtype, shape, absolute byte offset)`` in the file's order.

    Raises:
        PriorFormatError: ``"corrupted or truncated"`` — a header that is not JSON, offsets outside the file,
            overlapping or leaving gaps, a size that is not the shape's, a dtype safetensors does not define.
    """

    def __init__(self, fd: int, where: str) -> None:
        self.where = where
        self._mm: mmap.mmap | None = None
        try:
            size = os.fstat(fd).st_size
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                raise self._bad(f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise self._bad(f"header of {n} bytes in a file of {size}")
            try:
                header = json.loads(os.pread(fd, n, 8))
            except (ValueError, UnicodeDecodeError, RecursionError) as err:
                raise self._bad(f"header is not JSON: {str(err)[:100]}") from None
            self.metadata, self.entries = self._parse(header, size - 8 - n, 8 + n)
            if size > 0:
                self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)  # the map holds the file

    def _bad(self, why: str) -> PriorFormatError:
        return PriorFormatError(f"{self.where}: corrupted or truncated safetensors file ({why})")

    def _parse(self, header: Any, data_size: int, start: int) -> tuple[dict[str, str], dict]:
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("`__metadata__` must map strings to strings")
        entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        spans = []
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
                if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (*shape, begin, end)):
                    raise TypeError
            except KeyError:
                code = info.get("dtype") if isinstance(info, dict) else None
                raise self._bad(f"`{name}` has dtype {code!r}, which this reader does not know") from None
            except (TypeError, ValueError, AttributeError):
                raise self._bad(f"`{name}` has a malformed entry {str(info)[:100]}") from None
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise self._bad(f"`{name}` spans {end - begin} bytes; shape {list(shape)} needs another size")
            entries[name] = (dtype, shape, start + begin)
            spans.append((begin, end, name))
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                raise self._bad(f"`{name}` starts at byte {begin}, expected {position} (gap or overlap)")
            position = end
        if position != data_size:
            raise self._bad(f"the tensors cover {position} bytes of data, the file holds {data_size}")
        return meta, entries

    def read(self, name: str, index: Any = None) -> Tensor:
        """Tensor ``name``, or a contiguous copy of only ``index`` of it (a tuple of slices): only the pages that
        hold the requested elements are read. The whole tensor is a view of the file's private (copy-on-write)
        map, as safetensors gives: no copy, writable, and unchanged by later renames over the file's name."""
        dtype, shape, offset = self.entries[name]
        numel = math.prod(shape)
        if self._mm is None or numel == 0:
            whole = torch.empty(shape, dtype=dtype)
        elif offset % dtype.itemsize == 0:
            whole = torch.frombuffer(self._mm, dtype=dtype, count=numel, offset=offset).reshape(shape)
        else:  # a file written unaligned by another tool: copy the bytes to aligned memory
            raw = torch.frombuffer(self._mm, dtype=torch.uint8, count=numel * dtype.itemsize, offset=offset)
            whole = raw.clone().view(dtype).reshape(shape)
        if index is None or index is Ellipsis:
            return whole
        return whole[index].clone(memory_format=torch.contiguous_format)

    def __getitem__(self, name: str) -> Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def close(self) -> None:
        """Let go of the file: it is unmapped when no tensor read from it remains (a whole tensor is a view of
        the map and holds it; unmapping it explicitly would leave such tensors pointing at nothing)."""
        self._mm = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def header_bytes(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The 8-byte length and the canonical JSON header (sorted keys, padded with spaces to 8 bytes) of a file
    holding ``specs`` (``name -> (dtype, shape)``) in that order, and each tensor's ``(begin, end)`` data range.

    Example:
        >>> head, ranges = header_bytes({"x": (torch.float32, (2,))}, {"format": "pt"})
        >>> len(head) % 8, ranges
        (0, {'x': (0, 8)})
    """
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    ranges = {}
    offset = 0
    for key, (dtype, shape) in specs.items():
        size = math.prod(shape) * dtype.itemsize
        entries[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        ranges[key] = (offset, offset + size)
        offset += size
    text = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text = text.ljust(-(-len(text) // 8) * 8)
    return len(text).to_bytes(8, "little") + text, ranges


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]


def write_tensor_file(fd: int, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (CPU, contiguous) and ``metadata`` as a safetensors file to the new, empty file ``fd``
    (not closed here): tensors ordered by decreasing element size then name, so every tensor is aligned."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    head, _ = header_bytes({k: (tensors[k].dtype, tuple(tensors[k].shape)) for k in order}, metadata)
    _write_all(fd, memoryview(head))
    for key in order:
        t = tensors[key]
        if t.numel():
            _write_all(fd, memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
