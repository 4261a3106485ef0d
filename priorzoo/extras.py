"""Optional dependencies: import one, or fail with an ImportError that names the pip extra providing it.

Example:
    >>> require("math").sqrt(4.0)
    2.0
"""

from __future__ import annotations

from typing import Any

__all__ = ["require"]

_EXTRAS = {
    "timm": "timm",
    "transformers": "transformers",
    "datasets": "datasets",
    "accelerate": "transformers",
}


def require(module: str, extra: str | None = None, *, what: str = "") -> Any:
    """Import an optional dependency or raise an ImportError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        extra = extra or _EXTRAS.get(top, top)
        purpose = f" for {what}" if what else ""
        raise ImportError(
            f"`{top}` is needed{purpose} but could not be imported ({err}); "
            f'install it with `pip install "priorzoo[{extra}]"`'
        ) from err
