r"""Computing the prior term in a background thread, overlapped with the model's forward and backward.

The prior term's value and gradient depend only on the current weights w, which are final from the start
of an optimiser step until ``optimizer.step()``. Its cost is two passes over the K×P factor, bound by
memory bandwidth, while a transformer's forward/backward is bound by arithmetic; on a CPU the two overlap
well. :meth:`~priorzoo.finetune.PriorRegularizer.prefetch` starts :meth:`BoundPrior.value_and_grad` in a
thread at the start of the step, and the next use of the term (``reg()``, ``add_to_grad_()``) waits for it
instead of computing it. The result is the same computation on the same weights, so the step is unchanged.

Guards, so that overlapping can never change what is optimised:

* the result is used only if no covered parameter changed since it was started: each parameter's
  autograd version counter (bumped by every in-place update, e.g. ``optimizer.step()``) and storage address
  must be the same; otherwise it is discarded, the term is computed afresh and a warning says so once;
* a result is used at most once, and only by the binding it was computed for;
* CPU only: on an accelerator the kernels are already asynchronous to the host and would share the
  model's stream, so :meth:`prefetch` does nothing there and the term is computed when it is used.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> bound = PriorModel.from_tensors({"weight": torch.zeros(1, 2)}, variance=1.0).bind(lin)
    >>> pending = Prefetched.start(bound)
    >>> value, grads = pending.result()
    >>> torch.equal(grads[0], bound.value_and_grad()[1][0]) and pending.is_valid_for(bound)
    True
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from priorzoo.binding.bound import BoundPrior
from priorzoo.gaussian import Workspace

__all__ = ["Background", "PrecomputedPenalty", "Prefetched", "weights_signature"]


def weights_signature(parameters: list[torch.nn.Parameter]) -> tuple[tuple[int, int], ...]:
    """(version counter, storage address) of each parameter: changes whenever a weight is updated in place
    through autograd-visible ops (every ``torch.optim`` optimiser) or its storage is replaced."""
    return tuple((p._version, p.data_ptr()) for p in parameters)


class Prefetched:
    """The value and gradient of a :class:`BoundPrior`'s penalty, being computed in a daemon thread."""

    def __init__(self, bound: BoundPrior, workspace: Workspace | None = None) -> None:
        self.bound = bound
        self.workspace = workspace
        self.signature = weights_signature(bound.parameters)
        self._result: tuple[Tensor, list[Tensor]] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="priorzoo-prior-prefetch", daemon=True)

    @classmethod
    def start(cls, bound: BoundPrior, workspace: Workspace | None = None) -> Prefetched:
        """Start computing ``bound.value_and_grad(workspace=workspace)`` now, in a new thread (the gradients
        are then views of ``workspace``: it must not be used by anything else until they are consumed)."""
        pending = cls(bound, workspace)
        pending._thread.start()
        return pending

    def _run(self) -> None:
        try:
            self._result = self.bound.value_and_grad(workspace=self.workspace)
        except BaseException as err:  # re-raised in the caller's thread by result()
            self._error = err

    def is_valid_for(self, bound: BoundPrior) -> bool:
        """True when computed for ``bound`` and none of its parameters changed since it was started."""
        return bound is self.bound and weights_signature(bound.parameters) == self.signature

    def wait(self) -> None:
        """Wait for the thread to finish (e.g. before discarding the result: it still reads the weights)."""
        self._thread.join()

    def result(self) -> tuple[Tensor, list[Tensor]]:
        """Wait for the thread; return (penalty, Σ⁻¹(w−μ) per parameter) or raise what it raised."""
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class PrecomputedPenalty(torch.autograd.Function):
    """The penalty as an autograd node whose value and gradient were computed beforehand.

    ``PrecomputedPenalty.apply(value, grads, *parameters)`` returns ``value``; its backward gives each
    parameter ``grad_out · grads[i]`` (cast to the parameter's dtype), so no pass over the factor is left
    for ``backward``. The node takes ownership of ``grads`` (scaled in place, handed to autograd): pass
    tensors nothing else uses, never views of a :class:`~priorzoo.gaussian.Workspace`.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: list[Tensor], *parameters: Tensor) -> Tensor:
        ctx.grads = grads
        ctx.dtypes = [p.dtype for p in parameters]
        return value.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        torch._foreach_mul_(ctx.grads, grad_out)  # no host sync: grad_out stays on the device
        out = [
            gr.to(dtype) if ctx.needs_input_grad[i + 2] else None
            for i, (gr, dtype) in enumerate(zip(ctx.grads, ctx.dtypes))
        ]
        ctx.grads = None
        return (None, None, *out)


class Background:
    """For :class:`~priorzoo.finetune.learned_scale.LearnedScale`: the prior term of every group at w̄ (from the
    saved copy of the weights, so the sample w̄ + σε put into them meanwhile cannot race with it) and the next
    step's ε, in a daemon thread started before the forward pass."""

    def __init__(self, owner: Any, tensors: list[list[Tensor]], params: list[torch.nn.Parameter], key: str) -> None:
        self._owner = owner
        self._tensors = tensors
        self._params = params
        self._key = key
        self._result: list[Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="priorzoo-learned-scale", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            owner = self._owner
            out: list[Any] = []
            with torch.no_grad():
                for g, tensors in zip(owner.groups, self._tensors):
                    if g.bound is None:
                        out.append(None)
                        continue
                    out.append(
                        g.bound.value_and_grad(
                            [t.view(p.shape) for t, p in zip(tensors, g.params)], workspace=owner._workspace(g)
                        )
                    )
                self._result = out
                owner._prefetch_noise(self._params, self._key)
        except BaseException as err:  # re-raised in the caller's thread by result()
            self._error = err

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> list[Any]:
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
