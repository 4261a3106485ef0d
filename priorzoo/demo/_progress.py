"""The demo's progress bar: one tqdm bar over the whole pipeline, and a loader wrapper that advances it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["CountingLoader", "Progress"]


class Progress:
    """One tqdm bar over the whole pipeline, counted in work units (batches and optimiser steps)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc="priorzoo demo", unit="step", dynamic_ncols=True)

    def stage(self, text: str) -> None:
        self.bar.set_description_str(text)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def finish(self) -> None:
        """Fill the bar (a diverged grid run ends early, so fewer units may have been counted)."""
        self.bar.n = self.bar.total
        self.bar.set_description_str("done")
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


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
