r"""Record on a prior's card the λ a downstream task learned: a ``finetune --scale learned`` run as a measured result.

``priorzoo finetune … --prior P --scale learned`` learns the prior's scale on the training data with the
data-emphasized ELBO (:mod:`priorzoo.finetune.learned_scale`) and writes ``metrics.json``. This module reads that
record (:func:`read_learned_scale_run`, every field validated once, here) and writes it into a copy of P's
config (:func:`record_learned_scale`): ``recommended_scale`` becomes a measured value
(:meth:`~priorzoo.format.config.PriorConfig.record_measured_scale`, with the task, N and the method), replacing
the learner's rule of thumb, and the run's test metrics become card results (role ``prior``,
:mod:`priorzoo.format.card_results`). ``priorzoo record-scale`` is the command line.

**Which number becomes ``recommended_scale``.** The learned λ_g of the prior-covered group is on the file's λ
scale (p_g = N(μ_g, λ_g S_g), S_g the prior's shape at λ = 1), but the two objectives weight the prior
differently. The data-emphasized ELBO is

.. math::

    \mathcal L_\text{DE}(\bar w) = \overline{\mathrm{NLL}}(\bar w) + \frac1D \sum_g \mathrm{KL}\bigl(
        \mathcal N(\bar w_g, \sigma^2 I)\,\|\,\mathcal N(\mu_g, \lambda_g S_g)\bigr),
    \qquad \nabla_{\bar w_g} \frac{\mathrm{KL}_g}{D} = \frac{S_g^{-1}(\bar w_g - \mu_g)}{\lambda_g\, D},

with D the number of trained weights (all groups, the head included), while priorzoo's fixed-λ objective
(:class:`~priorzoo.finetune.PriorRegularizer`, ρ = 1) is

.. math::

    \mathcal L_\lambda(w) = \overline{\mathrm{NLL}}(w) + \frac1N\,\tfrac12 (w-\mu)^\top (\lambda S)^{-1} (w-\mu),
    \qquad \nabla_w = \frac{S^{-1}(w - \mu)}{\lambda\, N},

N the number of training examples (S = diag(v) + FᵀF when ε = 0). The two pull the weights toward μ with the
same force at every w exactly when λN = λ_g D, i.e.

.. math::

    \lambda_\text{fixed} = \lambda_g \frac{D}{N} = \lambda_g\,\kappa ,

the λ at which the fixed-λ objective has the learned objective's stationary points (for the data term at w̄:
the DE-ELBO is the ELBO with the likelihood raised to the power κ, which is the untempered posterior with
the prior covariance multiplied by κ). That is what the card recommends, because ``recommended_scale`` is
what ``priorzoo finetune --prior P`` (and :meth:`~priorzoo.PriorModel.resolve_scale`) fine-tune with at a
fixed λ; the raw λ_g, κ, D, N, σ and the head's λ are kept with the result rows (``learned_scale``) and in the
text, so nothing is lost. It holds at that run's N: a fixed λ is weighted by 1/N, the learned one by 1/D.
With ε > 0 in the file it is exact on the low-rank and diagonal part only (the learned objective scales the
file's ε with λ_g/λ₀, a fixed λ keeps it).

Only one prior group can become one recommended λ. ``finetune --scale learned`` learns {backbone, head}: the
backbone's λ is recorded and the head's (a zero-mean prior on weights this prior does not cover) is kept in
the record only. A run with several prior groups (``groups="layer"`` / ``"block"``) is refused: no single
fixed λ pulls every layer as its own λ_g did, and averaging them would record a value no run used.

**Which prior.** ``metrics.json`` names the prior by its :func:`~priorzoo.format.content_id.content_id` (the
density, exclude patterns and buffers; not the card, so a prior that already recorded one task's λ keeps its
id); a run of another prior is refused, naming both ids.

Example:
    >>> import torch
    >>> from priorzoo import PriorModel
    >>> from priorzoo.format.content_id import content_id
    >>> prior = PriorModel.from_tensors({"w": torch.zeros(4)}, variance=1.0, exclude=["head.*"])
    >>> metrics = {"status": "ok", "num_train_examples": 10, "lr": 0.01, "method": "map",
    ...            "arguments": {"data": "/home/me/data/reviews.csv", "optimizer": "sgd"},
    ...            "prior": {"scale": "learned", "content_id": content_id(prior), "learned_scale": {
    ...                "scales": {"backbone": 0.5, "head": 2.0}, "sigma": 0.01, "kappa": 0.6,
    ...                "groups": {"backbone": 4, "head": 2}}},
    ...            "metrics": {"test": {"accuracy": 0.8, "nll": 0.5, "ece": 0.05, "num_examples": 20}}}
    >>> config = record_learned_scale(prior, metrics, task="reviews")
    >>> config.recommended_scale  # λ_g·D/N = 0.5 · 6/10
    0.3
    >>> [(r["metric"], r["value"]) for r in config.results]
    [('accuracy', 0.8), ('nll', 0.5), ('ece', 0.05)]
    >>> prior.config.recommended_scale is None  # the prior given is left as it was
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from priorzoo.format.card_results import finite_number, hub_repo_id
from priorzoo.format.config import PriorConfig
from priorzoo.format.content_id import content_id
from priorzoo.format.local_paths import public_name
from priorzoo.format.record import PriorRecord
from priorzoo.validation import check_float

__all__ = [
    "HEAD_GROUP",
    "METHOD",
    "TEST_METRICS",
    "LearnedScaleRun",
    "fixed_scale_equivalent",
    "read_learned_scale_run",
    "record_learned_scale",
]

HEAD_GROUP = "head"
"""The group of the trained weights the prior does not cover (its own zero-mean prior; not the card's λ)."""

TEST_METRICS = ("accuracy", "nll", "ece")
"""The test metrics of a run that become card results (those present and finite)."""

METHOD = "data-emphasized ELBO (Harvey, Petrov & Hughes, arXiv 2410.19675)"
"""How the λ was learned, as the card names it."""

_OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW"}


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{what}` must be an integer ≥ 1; received {value!r}")
    return value


def fixed_scale_equivalent(scale: float, *, num_trained: int, num_train_examples: int) -> float:
    """λ_g·D/N: the fixed λ whose penalty (weighted 1/N) pulls the weights as the learned λ_g (KL weighted 1/D) did.

    Example:
        >>> fixed_scale_equivalent(0.5, num_trained=600, num_train_examples=100)
        3.0
    """
    scale = check_float(scale, "scale", strict=True)
    return scale * _int(num_trained, "num_trained") / _int(num_train_examples, "num_train_examples")


@dataclass(frozen=True)
class LearnedScaleRun:
    """A validated ``finetune --scale learned`` run (:func:`read_learned_scale_run`).

    Attributes:
        content_id: the id of the prior the run used (:func:`~priorzoo.format.content_id.content_id`).
        data: the run's ``--data`` as given (may be a local path: never published as is).
        num_train_examples: N; ``num_trained``: D (every trained weight, head included); ``kappa``: D/N.
        scales: λ per group; ``group_sizes``: D_g per group; ``prior_group``: the one prior-covered group.
        sigma: σ of q(w) = N(w̄, σ²I); ``lr``: the learning rate kept; ``optimizer``: ``sgd`` / ``adamw``.
        method: ``map`` or ``bma``; ``lora_r``: the LoRA rank, or ``None``.
        test: the test metrics (``accuracy``, ``nll``, ``ece`` present and finite, and ``num_examples``).
    """

    content_id: str
    data: str
    num_train_examples: int
    num_trained: int
    kappa: float
    scales: dict[str, float]
    group_sizes: dict[str, int]
    prior_group: str
    sigma: float
    lr: float
    optimizer: str
    method: str
    lora_r: int | None
    test: dict[str, float]

    @property
    def learned_scale(self) -> float:
        """λ_g of the prior-covered group, on the file's λ scale."""
        return self.scales[self.prior_group]

    @property
    def recommended_scale(self) -> float:
        """The fixed-λ equivalent λ_g·D/N (module docstring)."""
        return fixed_scale_equivalent(
            self.learned_scale, num_trained=self.num_trained, num_train_examples=self.num_train_examples
        )


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"`{what}` must be an object; received {value!r:.80}")
    return value


def read_learned_scale_run(metrics: Mapping[str, Any]) -> LearnedScaleRun:
    """Validate a parsed ``metrics.json`` of ``priorzoo finetune --prior P --scale learned``.

    Raises:
        TypeError: ``metrics`` is not a dict.
        ValueError: the run did not finish (``status`` not ``ok``), used a fixed λ, no prior or L2-SP, records
            no prior id, a λ_g, σ or κ that is missing, not finite or ≤ 0, groups that disagree with the scales
            or with κ = D/N, several prior groups, no training data, N or lr, or no finite test metric.

    Example:
        >>> read_learned_scale_run({"status": "diverged", "reason": "loss nan"})
        Traceback (most recent call last):
        ...
        ValueError: the run's `status` is 'diverged' (loss nan): only a run that finished (status 'ok') measured a λ
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"`metrics` must be the parsed metrics.json (a dict); received {type(metrics).__name__}")
    status = metrics.get("status")
    if status != "ok":
        reason = metrics.get("reason") or metrics.get("error")
        raise ValueError(
            f"the run's `status` is {status!r}{f' ({reason})' if reason else ''}: only a run that finished "
            "(status 'ok') measured a λ"
        )
    prior = _mapping(metrics.get("prior"), "prior")
    if prior.get("source") == "l2sp":
        raise ValueError("the run learned the scale of L2-SP (`--l2sp learned`), not of a prior: nothing to record")
    if prior.get("scale") != "learned":
        if prior.get("source") is None and prior.get("scale") is None:
            raise ValueError("the run used no prior (`--no-prior`): it learned no λ")
        raise ValueError(
            f"the run used a fixed λ (`prior.scale` = {prior.get('scale')!r}), not a learned one: record a λ learned "
            "with `priorzoo finetune … --scale learned`"
        )
    cid = prior.get("content_id")
    if not isinstance(cid, str) or not cid:
        raise ValueError(
            "the run does not name the prior it used (no `prior.content_id` in metrics.json; runs of priorzoo before "
            "record-scale): run `priorzoo finetune … --scale learned` again with this version"
        )
    learned = _mapping(prior.get("learned_scale"), "prior.learned_scale")
    raw_scales = _mapping(learned.get("scales"), "prior.learned_scale.scales")
    sizes = _mapping(learned.get("groups"), "prior.learned_scale.groups")
    if not raw_scales or list(raw_scales) != list(sizes):
        raise ValueError(
            f"`prior.learned_scale`: the scales name groups {list(raw_scales)}, the group sizes {list(sizes)}; "
            "they must name the same groups"
        )
    scales = {g: check_float(v, f"prior.learned_scale.scales.{g}", strict=True) for g, v in raw_scales.items()}
    group_sizes = {g: _int(v, f"prior.learned_scale.groups.{g}") for g, v in sizes.items()}
    prior_groups = [g for g in scales if g != HEAD_GROUP]
    if not prior_groups:
        raise ValueError(f"`prior.learned_scale` has no prior-covered group (only {list(scales)}): no λ of the prior")
    if len(prior_groups) > 1:
        shown = ", ".join(f"{g}: {scales[g]:.4g}" for g in prior_groups[:6])
        raise ValueError(
            f"the run learned {len(prior_groups)} prior groups ({shown}{', …' if len(prior_groups) > 6 else ''}); a "
            "prior's card recommends one λ and no single fixed λ pulls every group as its own λ_g did: record a run "
            "with the default groups (backbone, head)"
        )
    sigma = check_float(learned.get("sigma"), "prior.learned_scale.sigma", strict=True)
    kappa = check_float(learned.get("kappa"), "prior.learned_scale.kappa", strict=True)
    n = _int(metrics.get("num_train_examples"), "num_train_examples")
    d = sum(group_sizes.values())
    if not math.isclose(kappa, d / n, rel_tol=1e-9):
        raise ValueError(
            f"`prior.learned_scale.kappa` is {kappa!r}, but the groups hold D = {d} weights and N = {n}: "
            f"D/N = {d / n!r}; the record is inconsistent"
        )
    lr = check_float(metrics.get("lr"), "lr", strict=True)
    arguments = _mapping(metrics.get("arguments"), "arguments")
    data = arguments.get("data")
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"`arguments.data` must name the training data; received {data!r}")
    test_raw = _mapping(_mapping(metrics.get("metrics"), "metrics").get("test"), "metrics.test")
    test = {k: float(test_raw[k]) for k in TEST_METRICS if finite_number(test_raw.get(k)) is not None}
    if not test:
        raise ValueError(
            f"`metrics.test` holds no finite {', '.join(TEST_METRICS)}: the card records λ with the result it gave; "
            "run finetune with `--test-data`"
        )
    if finite_number(test_raw.get("num_examples")) is not None:
        test["num_examples"] = test_raw["num_examples"]
    lora = metrics.get("lora")
    return LearnedScaleRun(
        content_id=cid,
        data=data,
        num_train_examples=n,
        num_trained=d,
        kappa=kappa,
        scales=scales,
        group_sizes=group_sizes,
        prior_group=prior_groups[0],
        sigma=sigma,
        lr=lr,
        optimizer=str(arguments.get("optimizer") or "sgd"),
        method=str(metrics.get("method") or "map"),
        lora_r=lora.get("r") if isinstance(lora, Mapping) and isinstance(lora.get("r"), int) else None,
        test=test,
    )


def _method(run: LearnedScaleRun) -> str:
    opt = _OPTIMIZERS.get(run.optimizer, run.optimizer)
    lora = f" (LoRA r={run.lora_r})" if run.lora_r is not None else ""
    bma = ", SWAG BMA" if run.method == "bma" else ""
    return f"{opt}{lora} + this prior{bma}, λ learned (DE-ELBO)"


def record_learned_scale(
    prior: PriorRecord,
    metrics: Mapping[str, Any] | LearnedScaleRun,
    *,
    task: str | None = None,
    hub_dataset: bool = False,
) -> PriorConfig:
    """A copy of ``prior.config`` that records the λ a ``finetune --scale learned`` run of this prior learned.

    ``recommended_scale`` becomes the run's fixed-λ equivalent λ_g·D/N (module docstring), measured: the
    ``measured_on`` text names the task, N, the method and the raw λ_g, κ, D, σ and lr, and the learner's rule of
    thumb is dropped. The run's test metrics are appended to ``results`` (role ``prior``, split ``test``, the
    method, N, λ, and ``learned_scale``: every group's λ and size, σ, κ, D). A later record replaces the
    recommendation; earlier result rows stay. ``prior`` itself is not changed; save the copy with
    ``PriorModel(config, prior.mean, prior.variance, prior.cov_factor, buffers=prior.buffers).save_pretrained(out)``.

    Args:
        prior: the loaded prior (its tensors give the id the run must name).
        metrics: the run's parsed ``metrics.json`` (or a :class:`LearnedScaleRun`).
        task: the task's name on the card (default: the training data's file or folder name, or its Hub id).
        hub_dataset: ``task`` is a Hub dataset id (its results may then enter the card's model-index).

    Raises:
        ValueError: see :func:`read_learned_scale_run`; the run used another prior (both ids named); an empty
            ``task``, or ``hub_dataset`` with a ``task`` that is not a Hub id.
    """
    run = metrics if isinstance(metrics, LearnedScaleRun) else read_learned_scale_run(metrics)
    own = content_id(prior)
    if run.content_id != own:
        raise ValueError(
            f"the run used another prior: its metrics.json names prior content id {run.content_id}, this prior's is "
            f"{own}. Record the run on the prior it fine-tuned with (`priorzoo finetune --prior …`)"
        )
    name = public_name(run.data) if task is None else task
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`task` must name the downstream task; received {task!r}")
    name = name.strip()
    if hub_dataset and hub_repo_id(name) is None:
        raise ValueError(f"`task` {name!r} is not a Hub dataset id (org/name), but `hub_dataset` says it is")
    lam_g, lam = run.learned_scale, run.recommended_scale
    d, n = run.num_trained, run.num_train_examples
    head = run.scales.get(HEAD_GROUP)
    head_text = f", the new head's λ = {head:.4g}" if head is not None else ""
    main = next(iter(run.test))
    eps = prior.config.eps
    eps_text = f"; exact for the low-rank and diagonal part (the file's ε = {eps:g} stays fixed)" if eps > 0 else ""
    measured_on = (
        f"on {name} (N = {n} training examples; test {main} {run.test[main]:.4g} with it), learned on the training "
        f"data alone with the {METHOD}, no validation split: λ_{run.prior_group} = {lam_g:.4g} for its "
        f"{run.group_sizes[run.prior_group]} weights{head_text}, σ = {run.sigma:.3g}, lr {run.lr:g}. The recommended "
        f"λ is its fixed-λ equivalent λ_g·D/N = {lam_g:.4g} × {d}/{n}: the penalty weighted by 1/N then pulls the "
        f"weights toward μ as the learned objective's KL weighted by 1/D (D = {d} trained weights) did{eps_text}"
    )
    record = {
        "objective": "data-emphasized ELBO",
        "scales": dict(run.scales),
        "groups": dict(run.group_sizes),
        "prior_group": run.prior_group,
        "sigma": run.sigma,
        "kappa": run.kappa,
        "num_trained": d,
        "fixed_scale_equivalent": lam,
    }
    notes = f"λ = λ_g·D/N, λ_g = {lam_g:.4g} learned (D = {d}){head_text}; lr {run.lr:g}; no validation data" + (
        f"; {run.test['num_examples']} test examples" if "num_examples" in run.test else ""
    )
    rows = [
        {
            "dataset": name,
            "hub_dataset": bool(hub_dataset),
            "role": "prior",
            "split": "test",
            "metric": metric,
            "value": run.test[metric],
            "method": _method(run),
            "num_train_examples": n,
            "scale": lam,
            "notes": notes,
            "learned_scale": record,
        }
        for metric in TEST_METRICS
        if metric in run.test
    ]
    config = dataclasses.replace(
        prior.config,
        learning=dict(prior.config.learning),
        results=[*prior.config.results, *rows],
        save_id=None,
    )
    config.record_measured_scale(lam, measured_on=measured_on)
    return config
