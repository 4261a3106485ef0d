"""Counting the ATen operations and host synchronisations of a piece of code (a CPU proxy for GPU kernel
launches and device→host waits, DESIGN §7)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SYNC_OPS = ("aten._local_scalar_dense", "aten.equal", "aten.is_nonzero")
PRODUCT_OPS = ("aten.mv", "aten.mm", "aten.addmm", "aten.addmv", "aten.matmul", "aten.dot", "aten.bmm")


class OpCounter(TorchDispatchMode):
    """Records every ATen op under it: ``ops`` (non-view op names), ``syncs`` (ops that make the host wait
    for a value), ``largest`` (bytes of the largest tensor an op returned) and, for matrix products, the
    float32 matmul precision in force when they ran."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self.product_precisions: list[str] = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__qualname__ if hasattr(func, "overloadpacket") else str(func)
        name = (
            f"aten.{func.overloadpacket._qualified_op_name.split('::')[-1]}"
            if hasattr(func, "overloadpacket")
            else name
        )
        if name in SYNC_OPS:
            self.syncs.append(name)
        if name in PRODUCT_OPS:
            self.product_precisions.append(torch.backends.cuda.matmul.fp32_precision)
        if not func.is_view:
            self.ops.append(name)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not func.is_view:
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out
