r"""Classification metrics of a predictive distribution: accuracy, NLL, expected calibration error.

Every function takes predictive *probabilities* ``probs`` of shape ``[n, C]`` (rows sum to 1: a softmax,
or a Bayesian model average of softmaxes, see :func:`priorzoo.finetune.bayes.average_predictive`) and
integer ``labels`` of shape ``[n]``. Use :func:`probabilities` to turn logits into probabilities.

Definitions (n examples, true class yᵢ, predicted class ŷᵢ = argmax_c p_{ic}, confidence
cᵢ = max_c p_{ic}):

.. math::

    \mathrm{acc} = \frac1n\sum_i [\hat y_i = y_i], \qquad
    \mathrm{NLL} = -\frac1n\sum_i \log p_{i y_i},

    \mathrm{ECE} = \sum_{b=1}^{M} \frac{|B_b|}{n}\,\Big|\mathrm{acc}(B_b) - \mathrm{conf}(B_b)\Big|,

where the M bins are equal-width in confidence, :math:`B_1 = \{i: c_i \le 1/M\}` and
:math:`B_b = \{i: (b-1)/M < c_i \le b/M\}` for b ≥ 2 (right-closed, so a confidence of exactly 1 falls in
the last bin), :math:`\mathrm{acc}(B)` the accuracy and :math:`\mathrm{conf}(B)` the mean confidence of
the examples in the bin; empty bins contribute 0. M = 15 by default, as in Guo et al., "On Calibration of
Modern Neural Networks" (ICML 2017); the estimator is the one of Naeini et al. (AAAI 2015). ECE is
reported as a fraction in [0, 1] (not a percentage).

Example:
    >>> import torch
    >>> from priorzoo.finetune.metrics import classification_metrics
    >>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> m = classification_metrics(probs, labels, num_bins=10)
    >>> round(m["accuracy"], 4), round(m["nll"], 4), round(m["ece"], 4)
    (0.6667, 0.4149, 0.3)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accuracy", "classification_metrics", "expected_calibration_error", "nll", "probabilities"]

_SUM_TOL = 1e-3


def probabilities(logits: Tensor) -> Tensor:
    """Softmax over the last dimension, computed in float32 (or float64 when the logits are float64).

    Example:
        >>> import torch
        >>> probabilities(torch.zeros(1, 4)).tolist()
        [[0.25, 0.25, 0.25, 0.25]]
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.softmax(logits.detach().to(dtype), dim=-1)


def _check(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(probs, Tensor) or probs.dim() != 2:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"`probs` must be a [n, C] tensor of probabilities; received {shape}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != probs.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"`labels` must be a [n] integer tensor with n = {probs.shape[0]}; received {shape}")
    if probs.shape[0] == 0:
        raise ValueError("`probs` is empty: metrics need at least one example")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must hold integer class ids; received dtype {labels.dtype}")
    num_classes = probs.shape[1]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes - 1}] (C = {num_classes}); found [{lo}, {hi}]")
    p = probs.detach().to(torch.float64)
    if not torch.isfinite(p).all() or float(p.min()) < 0:
        raise ValueError("`probs` must be finite and ≥ 0 (pass probabilities, not logits: see probabilities())")
    worst = float((p.sum(dim=1) - 1).abs().max())
    if worst > _SUM_TOL:
        raise ValueError(
            f"the rows of `probs` must sum to 1 (max |Σ_c p − 1| = {worst:.3g}); pass probabilities, not "
            "logits (see probabilities())"
        )
    return p, labels.detach().to(device=p.device, dtype=torch.long)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose most probable class is the label.

    Example:
        >>> import torch
        >>> accuracy(torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 0]))
        0.5
    """
    p, y = _check(probs, labels)
    return float((p.argmax(dim=1) == y).double().mean())


def nll(probs: Tensor, labels: Tensor, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood −(1/n) Σ log p(yᵢ), with p clamped at ``eps`` to stay finite.

    Example:
        >>> import torch
        >>> round(nll(torch.tensor([[0.5, 0.5]]), torch.tensor([1])), 6)  # log 2
        0.693147
    """
    p, y = _check(probs, labels)
    return float(-p.gather(1, y[:, None]).clamp_min(eps).log().mean())


def expected_calibration_error(probs: Tensor, labels: Tensor, *, num_bins: int = 15) -> float:
    """ECE with ``num_bins`` equal-width, right-closed confidence bins (see the module docstring).

    Example:
        >>> import torch
        >>> # two examples at confidence 0.9, one right and one wrong: |0.5 − 0.9| = 0.4
        >>> round(expected_calibration_error(torch.tensor([[0.9, 0.1], [0.9, 0.1]]), torch.tensor([0, 1])), 6)
        0.4
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be an integer ≥ 1; received {num_bins!r}")
    p, y = _check(probs, labels)
    conf, pred = p.max(dim=1)
    correct = (pred == y).double()
    # bin b (0-based) holds (b/M, (b+1)/M]; confidence 0 (impossible for a distribution) goes to bin 0.
    # The bin index is computed in the probabilities' own dtype, so that a float32 0.8 (stored as
    # 0.800000012) lands in (0.7, 0.8] as written, not in the bin above.
    own = probs.detach()
    own = own if own.dtype.is_floating_point else own.double()
    own_conf = own.max(dim=1).values.to(p.device)
    idx = (torch.ceil(own_conf * num_bins) - 1).clamp(0, num_bins - 1).long()
    n = p.shape[0]
    count = torch.zeros(num_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros_like(count).index_add_(0, idx, conf)
    sum_acc = torch.zeros_like(count).index_add_(0, idx, correct)
    # |B|/n · |acc(B) − conf(B)| = |Σ_B correct − Σ_B conf| / n
    return float((sum_acc - sum_conf).abs().sum() / n)


def classification_metrics(probs: Tensor, labels: Tensor, *, num_bins: int = 15) -> dict[str, float]:
    """``{"accuracy", "nll", "ece", "num_examples"}`` of a predictive distribution.

    Example:
        >>> import torch
        >>> classification_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))["accuracy"]
        1.0
    """
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": expected_calibration_error(probs, labels, num_bins=num_bins),
        "num_examples": int(labels.shape[0]),
    }
