"""The file names of a prior folder (``docs/format.md``), shared by saving, loading and the Hub code.

A prior folder holds ``config.json``, the tensors — ``prior.safetensors``, or the shard index
``prior.safetensors.index.json`` plus the shards ``prior-0000i-of-0000N.safetensors`` it names — and the
``README.md`` card. This module only names them; it imports nothing else of priorzoo, so
:mod:`priorzoo.serialization`, :mod:`priorzoo.prior` and :mod:`priorzoo.hub` can all use it.

Example:
    >>> is_prior_weights("prior-00001-of-00002.safetensors"), is_prior_weights("model.safetensors")
    (True, False)
"""

from __future__ import annotations

import re

__all__ = ["CARD_NAME", "CONFIG_NAME", "INDEX_NAME", "SHARD_RE", "WEIGHTS_NAME", "is_prior_weights"]

CONFIG_NAME = "config.json"
"""The prior's configuration (format version, kind, rank, λ, parameter names and shapes, provenance)."""
WEIGHTS_NAME = "prior.safetensors"
"""The tensors of an unsharded prior."""
INDEX_NAME = "prior.safetensors.index.json"
"""The shard index of a sharded prior (the Hub's convention: ``weight_map`` tensor name → shard file)."""
CARD_NAME = "README.md"
"""The model card."""
SHARD_RE = re.compile(r"prior-\d{5}-of-\d{5}\.safetensors")
"""The names of a sharded prior's tensor files (match with ``fullmatch``)."""


def is_prior_weights(name: str) -> bool:
    """Whether a file name is one of a prior's tensor files: the single file, the shard index or a shard.

    Example:
        >>> is_prior_weights(INDEX_NAME)
        True
    """
    return name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_RE.fullmatch(name) is not None
