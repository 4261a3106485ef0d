"""Environment workaround: let a CUDA-only torchvision build import next to a CPU-only torch.

Why this exists
---------------
On the project's CPU machines, pip resolves ``torch==2.13.0`` to a CPU wheel, but the only torchvision whose
own pin matches it (0.28.0) is a CUDA build. Its compiled ops cannot load, so ``import torchvision`` (and
with it ``import timm``, and ``transformers`` model code, which imports torchvision when it is installed)
fails with ``RuntimeError: operator torchvision::nms does not exist``: torchvision's Python layer registers
fake/meta kernels for ops whose schemas were never defined.

What it does
------------
``install()`` puts a tiny import hook on ``sys.meta_path``. The first time anything imports ``torchvision``
the hook tries the real import. Only if that import fails with the missing-operator error does it define
the schemas of the two ops torchvision registers Python kernels for (``nms``, ``qnms``) in a
``torch.library`` FRAGMENT and import torchvision again. Everything that does not need torchvision's
compiled detection ops works as usual (timm models, transforms); calling ``torchvision.ops.nms`` itself
still fails, as it would have anyway.

It is not part of the ``priorzoo`` package and never on its import path. ``python tools/torchvision_shim.py
install`` writes a one-line ``.pth`` file into site-packages that calls ``install()`` at interpreter start
(cheap: it imports nothing heavy until torchvision is imported). ``python tools/torchvision_shim.py
uninstall`` removes it. On a machine with a matching torchvision the hook does nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import shutil
import sys
import sysconfig
from pathlib import Path

_MARK = "_priorzoo_torchvision_shim_active"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list = []  # keeps the torch.library fragment alive


def _define_missing_schemas() -> None:
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        with contextlib.suppress(RuntimeError):  # already defined by a working build or an earlier call
            lib.define(schema)
    _LIBRARIES.append(lib)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Meta-path hook that retries a failed ``import torchvision`` once with the op schemas defined."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision" or getattr(sys, _MARK, False):
            return None
        setattr(sys, _MARK, True)
        try:
            sys.meta_path.remove(self)
            try:
                importlib.import_module("torchvision")
            except RuntimeError as err:
                if "torchvision::" not in str(err) or "does not exist" not in str(err):
                    raise
                for mod in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                    del sys.modules[mod]
                _define_missing_schemas()
                importlib.import_module("torchvision")
        finally:
            setattr(sys, _MARK, False)
        return sys.modules["torchvision"].__spec__


def install() -> None:
    """Register the import hook (idempotent)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _cli(argv: list[str]) -> int:
    action = argv[0] if argv else "install"
    site = _site_packages()
    module_dst = site / "_priorzoo_torchvision_shim.py"
    pth = site / "_priorzoo_torchvision_shim.pth"
    if action == "install":
        shutil.copyfile(__file__, module_dst)
        pth.write_text("import _priorzoo_torchvision_shim; _priorzoo_torchvision_shim.install()\n")
        print(f"torchvision shim installed: {pth}")
        return 0
    if action == "uninstall":
        for p in (pth, module_dst):
            p.unlink(missing_ok=True)
        print("torchvision shim removed")
        return 0
    print(f"usage: python {Path(__file__).name} [install|uninstall]; received {action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_cli(sys.argv[1:]))
