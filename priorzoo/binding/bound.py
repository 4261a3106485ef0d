r"""``BoundPrior``: a prior matched onto one model, with everything the penalty needs precomputed.

:meth:`priorzoo.PriorModel.bind` returns one. It holds the matched parameters in prior order and a
:class:`~priorzoo.gaussian.LowRankGaussian` over exactly those blocks (the exact marginal when some prior
parameters were excluded or are missing), on the parameters' device, so that each training step costs one
forward and one backward pass over the factor:

.. math:: \tfrac12 (w-\mu)^\top \Sigma^{-1} (w-\mu), \qquad
          \nabla_w = \Sigma^{-1}(w-\mu) = A^{-1} r - \lambda A^{-1} F^\top C^{-1} F A^{-1} r

(Woodbury; see :mod:`priorzoo.gaussian`; Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022).

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> lin = torch.nn.Linear(3, 1)
    >>> bound = PriorModel.from_tensors({"weight": torch.zeros(1, 3)}, variance=1.0, exclude=["bias"]).bind(lin)
    >>> bound.prior_names
    ['weight']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from priorzoo.binding.matching import MatchResult
from priorzoo.format.record import PriorRecord
from priorzoo.gaussian import LowRankGaussian, Workspace

__all__ = ["BindablePrior", "BoundPrior", "register_binding"]


@runtime_checkable
class BindablePrior(PriorRecord, Protocol):
    """What a binding reads from a prior (:class:`priorzoo.PriorModel` is one): its tensors and config, and the
    Gaussian over a subset of its names on a device and in a dtype."""

    def gaussian(
        self,
        names: Sequence[str] | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankGaussian: ...


# bindings for models a plain BoundPrior cannot serve, registered by the modules that implement them
# (priorzoo.binding.sharded: FSDP2 DTensors), so that PriorModel.bind dispatches to them without importing them
_BINDINGS: list[tuple[Callable[[Sequence[Tensor]], bool], type[BoundPrior]]] = []
_MODEL_CHECKS: list[Callable[..., None]] = []


def register_binding(
    cls: type[BoundPrior],
    *,
    claims: Callable[[Sequence[Tensor]], bool],
    check: Callable[..., None] | None = None,
) -> None:
    """Make :meth:`~priorzoo.PriorModel.bind` return ``cls(prior, model, match, dtype=...)`` when
    ``claims(matched parameters)`` is true; ``check(model, where=...)`` runs on every model first (it
    raises for models no binding can serve).

    Example:
        >>> from priorzoo.binding.sharded import ShardedBoundPrior
        >>> any(c is ShardedBoundPrior for _, c in _BINDINGS)  # registered by priorzoo.binding.sharded
        True
    """
    _BINDINGS.append((claims, cls))
    if check is not None:
        _MODEL_CHECKS.append(check)


def check_model(model: torch.nn.Module, *, where: str) -> None:
    """Run every registered model check (e.g. FSDP1 / DeepSpeed ZeRO-3 refused by priorzoo.binding.sharded)."""
    for check in _MODEL_CHECKS:
        check(model, where=where)


def registered_binding(parameters: Sequence[Tensor]) -> type[BoundPrior] | None:
    """The registered binding class that claims these matched parameters, or ``None`` (a plain one)."""
    return next((cls for claims, cls in _BINDINGS if claims(parameters)), None)


class BoundPrior:
    """A prior matched onto one model, with the precomputation (A⁻¹, chol C, device copies) done once.

    Calling it (or :meth:`penalty`) returns ½(w−μ)ᵀΣ⁻¹(w−μ) over the model's matched parameters; its
    backward adds Σ⁻¹(w−μ) to their ``.grad``. The exact marginal is used when some prior parameters were
    excluded or missing.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 1)
        >>> from priorzoo import PriorModel
        >>> p = PriorModel.from_tensors({"weight": torch.zeros(1, 3), "bias": torch.zeros(1)}, variance=2.0)
        >>> bound = p.bind(lin)
        >>> loss = bound() / 100  # penalty / N
        >>> loss.backward()
    """

    def __init__(
        self, prior: BindablePrior, model: torch.nn.Module, match: MatchResult, *, dtype: torch.dtype | None = None
    ) -> None:
        self._take_matched(prior, model, match)
        self.device = self.parameters[0].device
        devices = {p.device for p in self.parameters}
        if len(devices) > 1:
            raise ValueError(
                f"the matched parameters live on several devices {sorted(map(str, devices))}; "
                "bind the prior to a model on one device (model parallelism is not supported)"
            )
        self._signature = self._current_signature()
        self.gaussian = prior.gaussian(self.prior_names, device=self.device, dtype=dtype)

    def _take_matched(self, prior: BindablePrior, model: torch.nn.Module, match: MatchResult) -> None:
        """Keep the prior, the match and the model's matched parameters in prior order (every binding's start)."""
        self.prior = prior
        self.match = match
        params = dict(model.named_parameters())
        self.prior_names = list(match.matched)
        self.parameters: list[torch.nn.Parameter] = [params[match.matched[n]] for n in self.prior_names]

    def _current_signature(self) -> tuple:
        return tuple((id(p), p.device, p.dtype) for p in self.parameters)

    def is_current(self) -> bool:
        """False once the model's parameters were replaced or moved (then re-bind)."""
        return self._current_signature() == self._signature

    def _blocks(self, tensors: Sequence[Tensor] | None) -> Sequence[Tensor]:
        """The tensors to evaluate at: the matched parameters, or ``tensors`` checked against them."""
        if tensors is None:
            return self.parameters
        if isinstance(tensors, Tensor) or len(tensors) != len(self.prior_names):
            got = "one tensor" if isinstance(tensors, Tensor) else f"{len(tensors)} tensors"
            raise ValueError(
                f"`tensors` must be a sequence of {len(self.prior_names)} tensors, one per prior parameter in "
                f"`bound.prior_names` order; received {got}"
            )
        for name, t, p in zip(self.prior_names, tensors, self.parameters):
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"`tensors` entry for `{name}` must have shape {tuple(p.shape)}; received {shape}")
        return tensors

    def penalty(self, tensors: Sequence[Tensor] | None = None) -> Tensor:
        """½ (w−μ)ᵀΣ⁻¹(w−μ), differentiable in the matched parameters (or in ``tensors``).

        Args:
            tensors: evaluate at these tensors instead of the matched parameters: one per entry of
                :attr:`prior_names`, in that order and with that parameter's shape (e.g. the effective
                weights W₀ + s·BA of a LoRA model); the gradient flows into them.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1, bias=False)
            >>> bound = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0).bind(lin)
            >>> w = torch.ones(1, 2, requires_grad=True)
            >>> bound.penalty([w]).item()  # ½ (1 + 1)
            1.0
        """
        return self.gaussian.half_quad(self._blocks(tensors))

    __call__ = penalty

    def log_prob(self, tensors: Sequence[Tensor] | None = None) -> Tensor:
        """Exact log-density (float64) of the matched parameters (or ``tensors``) under the (marginal) prior."""
        return self.gaussian.log_prob(self._blocks(tensors))

    def value_and_grad(
        self, tensors: Sequence[Tensor] | None = None, *, workspace: Workspace | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """(penalty, Σ⁻¹(w−μ) per matched parameter shaped like it), without autograd: for code that adds
        the prior's gradient to ``.grad`` itself (e.g. after a DDP all-reduce).

        The penalty is a 0-dim tensor on the prior's device (no host synchronisation).

        Args:
            tensors: evaluate at these instead of the matched parameters (see :meth:`penalty`).
            workspace: (from :meth:`new_workspace`) reuse its buffers instead of allocating 2P floats per
                call; the returned gradients are then views of it, valid until its next use.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> lin = torch.nn.Linear(2, 1, bias=False)
            >>> bound = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=2.0).bind(lin)
            >>> value, grads = bound.value_and_grad([torch.ones(1, 2)])
            >>> value.item(), grads[0].tolist()  # ½·2/2, Σ⁻¹w
            (0.5, [[0.5, 0.5]])
        """
        blocks = self._blocks(tensors)
        value, grads = self.gaussian.value_and_grad(blocks, workspace=workspace)
        return value, [g.reshape(b.shape) for g, b in zip(grads, blocks)]

    def new_workspace(self) -> Workspace:
        """Reusable buffers for :meth:`value_and_grad` (2P floats in the compute dtype, on the prior's device)."""
        return self.gaussian.new_workspace()

    def precision_times_residual(self) -> list[Tensor]:
        """Σ⁻¹(w−μ) per matched parameter (shaped like it), without autograd."""
        return self.value_and_grad()[1]
