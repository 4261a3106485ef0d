"""Batch-norm running statistics of a :class:`~priorzoo.learn.SWAGCollector`: averaged over the snapshots
(``running_statistics``) or recomputed for the SWA mean (``to_prior(bn_data=...)``, update_bn-style), so a
prior of a batch-norm network carries statistics that fit its mean (``docs/format.md`` §3-5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from priorzoo.learn._common import running_statistics

__all__ = ["SWAGBuffersMixin"]


class SWAGBuffersMixin:
    """The batch-norm half of :class:`~priorzoo.learn.SWAGCollector` (it inherits these methods)."""

    def _collect_buffers(self, model: torch.nn.Module) -> None:
        if not self.buffer_layers:
            return
        stats = running_statistics(model, skip=self.head_names)
        for name, t in stats.items():
            if t.dtype.is_floating_point:
                acc = self._buffer_sum.get(name)
                self._buffer_sum[name] = t.double() if acc is None else acc.add_(t)
            else:
                self._buffer_last[name] = t
        self._buffer_n += 1

    def running_statistics(self) -> dict[str, Tensor]:
        """The batch-norm running statistics averaged over the snapshots (``num_batches_tracked``: the
        latest), ``"<layer>.running_mean"`` etc.; empty without batch norm or with ``buffers=False``.

        Example:
            >>> import torch
            >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
            >>> from priorzoo.learn import SWAGCollector
            >>> c = SWAGCollector(net, rank=2); c.collect()
            >>> sorted(c.running_statistics())
            ['1.num_batches_tracked', '1.running_mean', '1.running_var']
        """
        if not self._buffer_n:
            return {}
        out = {n: (t / self._buffer_n).float() for n, t in self._buffer_sum.items()}
        out.update({n: t.clone() for n, t in self._buffer_last.items()})
        order = list(running_statistics(self.model, skip=self.head_names))
        return {n: out[n] for n in order if n in out}

    @torch.no_grad()
    def _statistics_of_mean(
        self, data: Any, forward: Callable[[torch.nn.Module, Any], Any] | None, num_batches: int | None
    ) -> dict[str, Tensor]:
        """Recompute the running statistics for the SWA mean: copy w̄ into the model, re-estimate them on
        ``data`` (:func:`priorzoo.finetune.refresh_batchnorm_`), read them, then put the weights and
        statistics back."""
        from priorzoo.finetune.batchnorm import refresh_batchnorm_

        named = dict(self.model.named_parameters())
        saved = {n: named[n].detach().clone() for n in self.names}
        buffers = dict(self.model.named_buffers())
        saved_buffers = {n: b.detach().clone() for n, b in buffers.items()}
        try:
            for n, t in self._unflatten(self._mean).items():
                named[n].copy_(t.to(named[n].dtype))
            kwargs: dict[str, Any] = {"num_batches": num_batches}
            if forward is not None:
                kwargs["forward"] = forward
            refresh_batchnorm_(self.model, data, **kwargs)
            return running_statistics(self.model, skip=self.head_names)
        finally:
            for n, t in saved.items():
                named[n].copy_(t)
            for n, t in saved_buffers.items():
                buffers[n].copy_(t)
