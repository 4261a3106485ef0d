r"""The fine-tuning prior term as one validated value: :class:`PriorTerm`.

The term of the objective (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022, eq. 2) for N training examples,

.. math:: \frac{\rho}{N}\cdot\tfrac12 (w-\mu)^\top \Sigma^{-1} (w-\mu), \qquad
    \Sigma = \lambda\,(\operatorname{diag}(v) + F^\top F) + \varepsilon I,

needs, besides the prior and the model, N, ρ, λ (or ``"learned"``, with its options) and which parameters the
prior covers (:class:`~priorzoo.BindOptions`). They are checked once, where they enter (``PriorRegularizer``,
``PriorCallback``, ``PriorTrainer`` build a ``PriorTerm`` from their keywords), and this one frozen value travels
down to the binding: nothing below re-checks or re-spells them.

Example:
    >>> from priorzoo.finetune import PriorTerm
    >>> term = PriorTerm(num_train_examples=1000, scale=10.0)
    >>> term.coefficient, term.learned
    (0.001, False)
    >>> PriorTerm(num_train_examples=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ValueError: `num_train_examples` (N) must be > 0 ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from priorzoo.binding.options import BindOptions
from priorzoo.finetune.learned_scale import is_learned
from priorzoo.finetune.scale_groups import check_groups
from priorzoo.prior import PriorModel
from priorzoo.validation import check_float, check_num_train_examples, check_prior_weight, check_scale

__all__ = ["PriorTerm"]


@dataclass(frozen=True)
class PriorTerm:
    """N, ρ, λ and the bind options of the prior term, validated when built.

    Args:
        num_train_examples: N > 0, the number of training examples (the whole training set, not a batch, not
            per process); ``None``: not known yet (``PriorCallback``/``PriorTrainer`` take ``len(train_dataset)``
            when training begins, see :meth:`with_num_train_examples`).
        prior_weight: ρ > 0, multiplies the prior term (1 = posterior).
        scale: λ > 0 replacing the prior's own scale; ``None``: the prior's (:meth:`priorzoo.PriorModel.resolve_scale`:
            a learned prior whose λ was not chosen uses its ``recommended_scale``); ``"learned"``: learn one λ_g per
            group (:mod:`priorzoo.finetune.learned_scale`; then ρ must be 1).
        bind: which parameters the prior covers (:class:`~priorzoo.BindOptions`).
        overlap: let the term be computed in a background thread, overlapped with the model's forward and backward.
        groups, sigma_init, sigma_lr, seed: the learned-scale options (used with ``scale="learned"`` only; see
            :class:`~priorzoo.finetune.learned_scale.LearnedScale`).

    Raises:
        ValueError: N ≤ 0 or not an integer, ρ ≤ 0, λ ≤ 0 (or another string than ``"learned"``), ρ ≠ 1 with
            learned scales, an unknown ``groups``, σ or its learning rate ≤ 0, a ``seed`` that is no integer.
        TypeError: ``bind`` not a ``BindOptions``, ``overlap`` not a bool.
    """

    num_train_examples: int | None = None
    prior_weight: float = 1.0
    scale: float | str | None = None
    bind: BindOptions = field(default_factory=BindOptions)
    overlap: bool = True
    groups: str | Callable[[str], str] = "default"
    sigma_init: float = 1e-3
    sigma_lr: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.num_train_examples is not None:
            put("num_train_examples", check_num_train_examples(self.num_train_examples))
        put("prior_weight", check_prior_weight(self.prior_weight))
        if self.learned:
            if self.prior_weight != 1.0:
                raise ValueError(
                    "`prior_weight` must be 1 with scale='learned' (the data-emphasized ELBO weights the KL by "
                    f"1/D); received {self.prior_weight!r}"
                )
            put("groups", check_groups(self.groups))
            put("sigma_init", check_float(self.sigma_init, "sigma_init", strict=True))
            put("sigma_lr", check_float(self.sigma_lr, "sigma_lr", strict=True))
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise ValueError(f"`seed` must be an integer; received {self.seed!r}")
        elif self.scale is not None:
            put("scale", check_scale(self.scale))
        if not isinstance(self.bind, BindOptions):
            raise TypeError(f"`bind` must be a priorzoo.BindOptions; received {type(self.bind).__name__}")
        if not isinstance(self.overlap, bool):
            raise TypeError(f"`overlap` must be True or False; received {self.overlap!r}")

    @property
    def learned(self) -> bool:
        """Whether λ is learned (``scale="learned"``)."""
        return is_learned(self.scale)

    @property
    def coefficient(self) -> float:
        """ρ/N, the factor in front of the penalty ½(w−μ)ᵀΣ⁻¹(w−μ) (needs N)."""
        if self.num_train_examples is None:
            raise ValueError("the prior term's N (num_train_examples) is not known yet")
        return self.prior_weight / self.num_train_examples

    def with_num_train_examples(self, num_train_examples: int) -> PriorTerm:
        """This term with N = ``num_train_examples`` (checked), the rest as it is.

        Example:
            >>> PriorTerm().with_num_train_examples(50).num_train_examples
            50
        """
        out = copy.copy(self)  # the rest is checked already: only N is new
        object.__setattr__(out, "num_train_examples", check_num_train_examples(num_train_examples))
        return out

    def resolve(self, prior: PriorModel) -> PriorModel:
        """The prior at the λ this term uses: ``scale`` when given; for ``None`` and ``"learned"`` the prior's
        own (:meth:`~priorzoo.PriorModel.resolve_scale`), which learned scales take as λ₀.

        Example:
            >>> import torch
            >>> from priorzoo import PriorModel
            >>> prior = PriorModel.from_tensors({"w": torch.zeros(2)}, variance=1.0, recommended_scale=1e4)
            >>> PriorTerm(scale=10.0).resolve(prior).scale, PriorTerm().resolve(prior).scale
            (10.0, 10000.0)
        """
        if not isinstance(prior, PriorModel):
            raise TypeError(f"`prior` must be a priorzoo.PriorModel; received {type(prior).__name__}")
        return prior.resolve_scale(None if self.learned or self.scale is None else float(self.scale))

    def learned_options(self) -> dict[str, Any]:
        """The keywords of :class:`~priorzoo.finetune.learned_scale.LearnedScale` this term carries.

        Example:
            >>> sorted(PriorTerm(scale="learned").learned_options())
            ['groups', 'seed', 'sigma_init', 'sigma_lr']
        """
        return {"groups": self.groups, "sigma_init": self.sigma_init, "sigma_lr": self.sigma_lr, "seed": self.seed}
