"""Floating-point guards for the prior term: IEEE float32 matrix products and no autocast.

Training stacks often switch TF32 on globally (``torch.backends.cuda.matmul.fp32_precision = "tf32"``,
``allow_tf32``, or transformers' ``tf32=True`` through ``torch.set_float32_matmul_precision``). TF32 rounds
the inputs of a product to a 10-bit mantissa, which moves the low-rank prior term's factor products by
~1e-3 relative; :func:`ieee_fp32_matmul` runs them in IEEE float32 and restores the caller's setting.

Example:
    >>> import torch
    >>> from priorzoo.numerics import ieee_fp32_matmul
    >>> with ieee_fp32_matmul():
    ...     torch.backends.cuda.matmul.fp32_precision in ("ieee", "none")
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ieee_fp32_matmul", "no_autocast"]

_REDUCED = ("tf32", "bf16")


def no_autocast(device: torch.device) -> torch.autocast:
    """The penalty is always computed in its own dtype: an enclosing bf16/fp16 autocast region would
    round the factor products (the gradient by ~1e-3 relative in bf16)."""
    return torch.autocast(device_type=device.type, enabled=False)


@contextlib.contextmanager
def _set_restore(get, put, value) -> Iterator[None]:
    old = get()
    put(value)
    try:
        yield
    finally:
        put(old)


def ieee_fp32_matmul() -> contextlib.AbstractContextManager:
    """A context in which float32 matrix products run in IEEE float32 (no TF32/bf16 emulation); restores the
    caller's setting on exit, through the same API it was set with (mixing PyTorch's legacy and new TF32
    APIs makes later reads raise). A no-op inside ``torch.compile`` and when nothing reduces precision.

    Example:
        >>> import torch
        >>> torch.backends.cuda.matmul.fp32_precision = "tf32"
        >>> with ieee_fp32_matmul():
        ...     torch.backends.cuda.matmul.fp32_precision
        'ieee'
        >>> torch.backends.cuda.matmul.fp32_precision
        'tf32'
        >>> torch.backends.cuda.matmul.fp32_precision = "none"
    """
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    try:
        generic = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through the backend-specific APIs: handled below
        generic = None
    if generic in ("high", "medium"):  # torch.set_float32_matmul_precision (transformers' tf32=True)
        stack.enter_context(
            _set_restore(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest")
        )
    else:
        cuda = torch.backends.cuda.matmul
        if cuda.fp32_precision in _REDUCED:
            try:
                legacy = bool(cuda.allow_tf32)
            except RuntimeError:  # set with the new API: answer with the new API
                legacy = None
            if legacy:
                stack.enter_context(
                    _set_restore(lambda: cuda.allow_tf32, lambda v: setattr(cuda, "allow_tf32", v), False)
                )
            else:
                stack.enter_context(
                    _set_restore(lambda: cuda.fp32_precision, lambda v: setattr(cuda, "fp32_precision", v), "ieee")
                )
        mkl = torch.backends.mkldnn.matmul
        if getattr(mkl, "fp32_precision", "none") in _REDUCED:
            stack.enter_context(
                _set_restore(lambda: mkl.fp32_precision, lambda v: setattr(mkl, "fp32_precision", v), "ieee")
            )
    return stack
