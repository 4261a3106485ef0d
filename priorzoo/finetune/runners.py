r"""Running methods: the loaders, optimisers, grid search and posterior runners every entry point shares.

The demo's comparison, ``priorzoo finetune``, :func:`~priorzoo.finetune.scale.tune_scale`, the zoo recipes
and the benchmarks all train through these helpers (and :func:`~priorzoo.finetune.loop.fit`), so a fix lands
once.

Example:
    >>> import torch
    >>> from priorzoo.finetune.runners import seeded_loader
    >>> [len(b[0]) for b in seeded_loader(torch.utils.data.TensorDataset(torch.zeros(5, 2)), 2, shuffle=False)]
    [2, 2, 1]
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["seeded_loader"]


def seeded_loader(
    dataset: Any, batch_size: int, *, shuffle: bool, seed: int = 0, **kwargs: Any
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` whose shuffling draws from its own generator seeded with ``seed``.

    Every call with the same seed replays the same order, whatever the global RNG has done in between;
    ``kwargs`` go to the ``DataLoader`` (``collate_fn``, ``num_workers``, ...).

    Example:
        >>> a = [b.tolist() for b in seeded_loader(list(range(6)), 3, shuffle=True, seed=1)]
        >>> a == [b.tolist() for b in seeded_loader(list(range(6)), 3, shuffle=True, seed=1)]
        True
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, **kwargs)
