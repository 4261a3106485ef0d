"""The demo's progress bars: one tqdm bar per phase, and a loader wrapper that advances the current one.

Each phase (loading, encoding, the source run, each fine-tuning method) gets its own bar with its own total,
so a bar's rate and time estimate are those of its own phase: one bar over the whole pipeline carried the
rate of a fast phase into a slow one (its first estimate was "2 hours").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["CountingLoader", "Progress"]


class Progress:
    """Sequential tqdm bars, one per phase, counted in work units (batches and optimiser steps).

    Example:
        >>> p = Progress(enabled=False)
        >>> p.phase("encoding", total=3); p.update(2); p.stage("batch 3/3"); p.update()
        >>> p.phase("training", total=5); p.bar.n, p.bar.total
        (0, 5)
        >>> p.close()
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self._name = ""

    def phase(self, name: str, total: int) -> None:
        """Close the current bar (filled: a run that ends early counts fewer units) and open one for ``name``."""
        from tqdm.auto import tqdm

        self._finish()
        self._name = name
        self.bar = tqdm(total=total, disable=not self.enabled, desc=name, unit="step", dynamic_ncols=True)

    def stage(self, text: str) -> None:
        """Say which part of the phase runs now (e.g. the grid point), next to the phase's name."""
        if self.bar is not None:
            self.bar.set_description_str(f"{self._name}: {text}" if text != self._name else text)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def _finish(self) -> None:
        if self.bar is not None:
            if self.bar.total is not None:
                self.bar.n = self.bar.total
            self.bar.set_description_str(self._name)
            self.bar.refresh()
        self.close()

    def finish(self) -> None:
        """Fill and close the last bar (the pipeline is done)."""
        self._finish()

    def close(self) -> None:
        """Close the current bar as it is (also after an error)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CountingLoader:
    """Re-iterable wrapper that advances the progress bar once per batch."""

    def __init__(self, loader: Iterable[Any], progress: Progress | None) -> None:
        self.loader, self.progress = loader, progress

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            yield batch
            if self.progress is not None:
                self.progress.update()
