r"""``PriorCallback``: add a learned prior to any transformers ``Trainer`` run with one line.

The Trainer minimises its own data loss; the callback makes the optimiser step the one of

.. math::

    L(w) = \underbrace{\text{(the Trainer's data loss)}}_{\text{mean CE for a classifier}}
         + \frac{\rho}{N}\cdot\tfrac12 (w-\mu)^\top\Sigma^{-1}(w-\mu),

(Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022, eq. 2; see :mod:`priorzoo.finetune.loop`) by
adding the analytic prior gradient ρ·Σ⁻¹(w − μ)/N to every covered parameter's ``.grad`` at
``on_pre_optimizer_step``: once per optimiser step, after the micro-batch gradients were accumulated,
all-reduced across processes (DDP) and unscaled (fp16), and before ``optimizer.step()``. So the prior term
enters exactly once per step whatever ``gradient_accumulation_steps``, the number of processes or the
mixed-precision mode, and costs one pass over the factor forward and one backward per step. On a CPU those
two passes run in a background thread, started as soon as the weights are final (``on_optimizer_step`` of
the previous step, or ``on_step_begin``), while the step's forward and backward passes run
(``overlap=True``, the default; see :meth:`PriorRegularizer.prefetch`).

Semantics to know (documented choices, not accidents):

* **The prior gradient is not clipped.** ``max_grad_norm`` clips the data gradient before the callback
  runs; the prior gradient is added afterwards, and the logged ``grad_norm`` is the data gradient's. Use
  :class:`~priorzoo.finetune.trainer.PriorTrainer` (the term inside ``compute_loss``) to clip the total.
* The prior term is *not* in the Trainer's logged ``loss``; the callback logs it as ``prior_term`` (mean
  of ρ·penalty/N over the steps since the last log) and ``train_prior_term`` at the end of training.
* The data term is whatever the Trainer makes of it. In transformers 5.x a model whose ``forward`` takes
  ``**kwargs`` (e.g. ``BertForSequenceClassification``) but ignores ``num_items_in_batch`` has its
  micro-batch mean losses *summed* over gradient accumulation (and multiplied by the number of processes
  under DDP with ``average_tokens_across_devices=True``), so its data gradient is that many times the
  mean-CE gradient while the prior term stays ρ·penalty/N. Set the Trainer's ``loss_is_scaled_for_ga =
  False`` (a class attribute in transformers ≥ 5) to get the mean back.
* Refused, with the reason: DeepSpeed (the engine steps inside ``backward``, before this event), FSDP and
  tensor/model parallelism (parameters are sharded, the prior's names and shapes do not apply), LOMO /
  AdaLOMO and layer-wise optimisers (they step inside ``backward``).

Example:
    >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
    >>> from priorzoo import PriorModel
    >>> from priorzoo.finetune import PriorCallback
    >>> prior = PriorModel.from_pretrained("org/bert-base-swag-prior")  # doctest: +SKIP
    >>> trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=train,  # doctest: +SKIP
    ...                   callbacks=[PriorCallback(prior, num_train_examples=len(train))])
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'priorzoo.finetune.PriorCallback needs transformers: pip install "priorzoo[transformers]"'
    ) from _err

from priorzoo.binding.matching import Patterns
from priorzoo.binding.options import BindOptions
from priorzoo.binding.sharded import check_parameters
from priorzoo.finetune.learned_scale import LEARNED
from priorzoo.finetune.learned_scale_checkpoint import resume_learned_state, save_to_checkpoint
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.finetune.term import PriorTerm
from priorzoo.prior import PriorModel
from priorzoo.validation import check_num_train_examples

__all__ = ["PriorCallback", "check_trainer_setup", "learned_scale_entries"]


def check_trainer_setup(args: Any, *, where: str, gradient_hook: bool) -> None:
    """Refuse Trainer configurations in which the prior term cannot be added correctly.

    Args:
        args: the ``TrainingArguments``.
        where: ``"PriorCallback"`` or ``"PriorTrainer"`` (for the message).
        gradient_hook: the prior gradient is added at ``on_pre_optimizer_step`` (the callback), so
            optimisers that step inside ``backward`` are refused as well.

    FSDP is accepted: the prior is bound once the Trainer has sharded the model (``on_train_begin``) and
    what is refused there — FSDP1's flattened parameters, DeepSpeed ZeRO-3 partitions — is decided from the
    parameters themselves (:func:`priorzoo.binding.sharded.check_parameters`). Nothing here reads environment
    variables: the Trainer's arguments and accelerate's live state decide.

    Raises:
        RuntimeError: DeepSpeed in the Trainer (its engine steps inside ``backward``; ZeRO-1/2 work in a plain
            loop through the loss path, see the README),
            Megatron/tensor/context parallelism, or (``gradient_hook``) LOMO/AdaLOMO and layer-wise
            optimisers.

    Example:
        >>> from types import SimpleNamespace
        >>> check_trainer_setup(SimpleNamespace(deepspeed=None, fsdp=None, optim="sgd"), where="x",
        ...                     gradient_hook=True)
    """
    reasons = []
    if getattr(args, "deepspeed", None):
        reasons.append(
            "DeepSpeed is enabled: accelerate's engine steps inside backward(), so a callback never sees the "
            "gradients, ZeRO-3 partitions the parameters, and priorzoo's Trainer integration has not been verified "
            "under DeepSpeed (use FSDP2: fsdp=True, fsdp_config={'fsdp_version': 2}; ZeRO stages 1 and 2 work in a "
            "plain loop through the loss path, engine.backward(loss + PriorRegularizer(...)()): verified with "
            "deepspeed 0.19 on CPU)"
        )
    try:
        from accelerate.state import AcceleratorState, is_initialized

        if is_initialized():
            kind = str(AcceleratorState().distributed_type).rsplit(".", 1)[-1].upper()
            if kind in ("DEEPSPEED", "MEGATRON_LM") and not reasons:
                reasons.append(f"accelerate runs with distributed_type {kind}, which priorzoo does not support")
    except ImportError:  # accelerate is a dependency of the Trainer; without it nothing to inspect
        pass
    pc = getattr(args, "parallelism_config", None)
    for attr in ("tp_size", "cp_size", "sp_size"):
        size = getattr(pc, attr, None) if pc is not None else None
        if isinstance(size, int) and size > 1:
            reasons.append(f"parallelism_config.{attr} = {size}: parameters are sharded across processes")
    if gradient_hook:
        optim = str(getattr(args, "optim", "")).rsplit(".", 1)[-1].lower()
        if "lomo" in optim or optim.endswith("layerwise"):
            reasons.append(
                f"optim={optim!r} updates the weights inside backward(), before on_pre_optimizer_step; use "
                "PriorTrainer (the prior term inside compute_loss) or another optimiser"
            )
    if reasons:
        raise RuntimeError(
            f"{where} refuses this Trainer configuration rather than train with a wrong prior term: "
            + "; ".join(reasons)
            + ". Supported: single process, DDP (multi-GPU or CPU/gloo), FSDP2, gradient accumulation, fp16/bf16."
        )


_FROM_DATASET: Any = object()
"""``PriorCallback``'s default ``num_train_examples``: ``len(train_dataset)``, read when training begins."""


def shards_late(args: Any) -> bool:
    """Whether the Trainer will shard the model when training starts (FSDP in its arguments or accelerate's
    live state), so that the prior is bound to the shards at ``on_train_begin`` rather than at init."""
    if getattr(args, "fsdp", None):
        return True
    try:
        from accelerate.state import AcceleratorState, is_initialized

        return is_initialized() and str(AcceleratorState().distributed_type).rsplit(".", 1)[-1].upper() == "FSDP"
    except ImportError:  # pragma: no cover - accelerate is a dependency of the Trainer
        return False


def num_train_examples_of(dataset: Any) -> int:
    """N = ``len(dataset)``: the default ``num_train_examples`` of ``PriorCallback`` and ``PriorTrainer``."""
    try:
        return check_num_train_examples(len(dataset))
    except TypeError:
        raise ValueError(
            "pass num_train_examples=N: the training dataset has no len() (an IterableDataset?), and "
            "N, the number of training examples, scales the prior term"
        ) from None


def learned_scale_entries(regularizer: PriorRegularizer | None) -> dict[str, float]:
    """What a learned-scale run adds to the Trainer's logs: ``prior_scale_<group>`` (each λ_g) and
    ``prior_sigma`` (σ); nothing for a fixed scale.

    Example:
        >>> learned_scale_entries(None)
        {}
    """
    if regularizer is None or regularizer.learned is None:
        return {}
    out = {f"prior_scale_{name}": value for name, value in regularizer.scales.items()}
    out["prior_sigma"] = regularizer.sigma
    return out


class _PriorTermLog:
    """Running means of the prior term ρ·penalty/N for the Trainer's logs: over the steps since the last log
    (logged as ``<key>``) and over the whole run (``train_<key>``, in the log that ends training)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._since_sum: Any = 0.0
        self._total_sum: Any = 0.0
        self._since_count = self._total_count = 0

    def add(self, value: torch.Tensor | float) -> None:
        """Accumulate one step's term; a tensor stays on its device (summed there: no host sync per step)."""
        if isinstance(value, torch.Tensor):
            value = value.detach().to(torch.float64)
        self._since_sum = self._since_sum + value
        self._since_count += 1
        self._total_sum = self._total_sum + value
        self._total_count += 1

    def entries(self, logs: Mapping[str, Any], key: str) -> dict[str, float]:
        """What to add to the Trainer's log record ``logs`` (the only place the sums reach the host); a
        training-loss record restarts the mean since the last log."""
        added = {}
        if "loss" in logs and self._since_count:
            added[key] = float(self._since_sum) / self._since_count
            self._since_sum, self._since_count = 0.0, 0
        if "train_loss" in logs and self._total_count:
            added[f"train_{key}"] = float(self._total_sum) / self._total_count
        return added


class PriorCallback(TrainerCallback):
    r"""A ``TrainerCallback`` that adds ρ·Σ⁻¹(w − μ)/N to the gradients before each optimiser step.

    See the module docstring for the objective and for what is (not) supported.

    Args:
        prior: the :class:`~priorzoo.PriorModel` (its head is excluded by matching).
        num_train_examples: N > 0, the number of training examples (the whole training set; under DDP
            still the global count, not per process). Not given: ``len(train_dataset)`` of the Trainer's
            training data, read when training begins (as ``PriorTrainer`` does).
        prior_weight: ρ > 0 (default 1: the posterior).
        scale: if given, λ > 0 replaces the prior's covariance scale; default:
            :meth:`PriorModel.resolve_scale` (the ``recommended_scale`` of a learned prior). ``"learned"``:
            learn λ_g per group on the training data (data-emphasized ELBO,
            :mod:`priorzoo.finetune.learned_scale`): the callback puts the sample w̄ + σε into the weights at
            ``on_step_begin`` and, at ``on_pre_optimizer_step``, restores w̄ and adds the KL's gradient; the
            logs gain ``prior_scale_<group>`` and ``prior_sigma``. Checkpoints carry σ's state and a resumed
            run continues it (:mod:`priorzoo.finetune.learned_scale_checkpoint`). σ's data gradient Σ ε·∇NLL is
            read from the gradients the optimiser is about to use (after ``max_grad_norm`` clipping, when it is on).
        groups, sigma_init, sigma_lr, seed: the learned-scale options (see
            :class:`~priorzoo.finetune.PriorRegularizer`).
        include, exclude, exclude_head, allow_partial, dtype: forwarded to :meth:`~priorzoo.PriorModel.bind`.
        log_key: name of the logged prior term (default ``prior_term``).
        overlap: start computing the prior term in a background thread as soon as the weights are final
            (after the previous optimiser step, or at ``on_step_begin``), so that it overlaps with the
            step's forward and backward passes on a CPU; ``on_pre_optimizer_step`` then only adds it. Same
            result; False computes it at ``on_pre_optimizer_step``. See :meth:`PriorRegularizer.prefetch`.

    Raises:
        ValueError: N ≤ 0, ρ ≤ 0, λ ≤ 0 (at construction); a prior on the meta device (at binding).
        priorzoo.PriorMatchError: the prior does not match the model (raised while the Trainer is built,
            from ``on_init_end``).
        RuntimeError: an unsupported Trainer configuration (DeepSpeed, FSDP, ...), at ``on_init_end`` /
            ``on_train_begin``.

    Example:
        >>> import torch
        >>> from priorzoo import PriorModel
        >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0)
        >>> cb = PriorCallback(prior, num_train_examples=1000, scale=10.0)
        >>> cb.scale, cb.num_train_examples
        (10.0, 1000)
    """

    def __init__(
        self,
        prior: PriorModel,
        num_train_examples: int = _FROM_DATASET,
        prior_weight: float = 1.0,
        *,
        scale: float | str | None = None,
        include: Patterns = None,
        exclude: Patterns = None,
        exclude_head: bool = True,
        allow_partial: bool = False,
        dtype: torch.dtype | None = None,
        log_key: str = "prior_term",
        overlap: bool = True,
        groups: Any = "default",
        sigma_init: float = 1e-3,
        sigma_lr: float = 0.05,
        seed: int = 0,
    ) -> None:
        if num_train_examples is None:  # not given means len(train_dataset); an explicit None is an error
            check_num_train_examples(num_train_examples)
        self.term = PriorTerm(
            num_train_examples=None if num_train_examples is _FROM_DATASET else num_train_examples,
            prior_weight=prior_weight,
            scale=scale,
            bind=BindOptions(
                include=include, exclude=exclude, exclude_head=exclude_head, allow_partial=allow_partial, dtype=dtype
            ),
            overlap=overlap,
            groups=groups,
            sigma_init=sigma_init,
            sigma_lr=sigma_lr,
            seed=seed,
        )
        self.prior = self.term.resolve(prior)
        self.log_key = str(log_key)
        self.regularizer: PriorRegularizer | None = None
        self._applied = 0
        self._log = _PriorTermLog()

    @property
    def scale(self) -> float | str:
        """λ, the prior's covariance scale, or ``"learned"``."""
        return LEARNED if self.term.learned else self.prior.scale

    @property
    def num_train_examples(self) -> int | None:
        """N (``None`` until training begins when it was not given)."""
        return self.term.num_train_examples

    @property
    def prior_weight(self) -> float:
        """ρ."""
        return self.term.prior_weight

    @property
    def overlap(self) -> bool:
        """Whether the term is computed in a background thread, overlapped with the step."""
        return self.term.overlap

    def _regularizer_for(self, model: torch.nn.Module | None) -> PriorRegularizer:
        if model is None:
            raise RuntimeError("PriorCallback received no model from the Trainer")
        if self.regularizer is None or self.regularizer.model is not model:
            self.regularizer = PriorRegularizer.from_term(self.prior, model, self.term)
        return self.regularizer

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_trainer_setup(args, where="PriorCallback", gradient_hook=True)
        if model is None:
            return
        if shards_late(args) or self.num_train_examples is None:  # FSDP shards at train(); N read then:
            self.term.bind.check_match(self.prior, model)  # match now, bind when training begins
        else:  # bind now, so that a mismatched prior fails when the Trainer is built
            self._regularizer_for(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        check_trainer_setup(args, where="PriorCallback", gradient_hook=True)
        if model is not None:
            check_parameters(model, where="PriorCallback")  # FSDP1 / ZeRO-3, from the parameters
        if self.num_train_examples is None:  # the default N: the size of the Trainer's training set
            loader = kwargs.get("train_dataloader")
            if loader is None:
                raise ValueError(
                    "PriorCallback received no train_dataloader from the Trainer: pass num_train_examples=N"
                )
            self.term = self.term.with_num_train_examples(num_train_examples_of(loader.dataset))
        reg = self._regularizer_for(model)  # model_init may have built a new model; FSDP2 sharded it by now
        resume_learned_state(reg.learned, args, state)  # a resumed run continues σ, its Adam and the noise
        self._log.reset()
        self._applied = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # the weights are final until optimizer.step(): compute the term while the micro-batches run (a
        # no-op when on_optimizer_step already started it for these weights); a learned scale instead puts the
        # sample w̄ + σε in for the step's forward and backward passes
        reg = self._regularizer_for(model)
        reg.perturb_()
        reg.prefetch()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # the next step's weights are final from here: start its term now, so that it also overlaps with
        # the scheduler, logging, evaluation and the loading of the next batches
        self._regularizer_for(model).prefetch()

    def on_save(self, args, state, control, **kwargs):
        if self.regularizer is not None:  # a learned scale's σ, Adam state and noise stream, for --resume
            save_to_checkpoint(self.regularizer.learned, args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.regularizer is not None:  # the term started after the last step is not needed
            self.regularizer._discard_prefetch()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        _unscale_if_needed(optimizer)
        value = self._regularizer_for(model).add_to_grad_()
        self._applied += 1
        self._log.add(value)

    def on_step_end(self, args, state, control, **kwargs):
        # a guard against Trainer versions/paths that step without firing on_pre_optimizer_step (or fire it
        # twice): the prior term must enter exactly once per optimiser step, never silently zero times
        applied, self._applied = self._applied, 0
        if applied != 1:
            raise RuntimeError(
                f"PriorCallback added the prior gradient {applied} time(s) in optimiser step {state.global_step}; "
                "it must be exactly once. This Trainer (version or configuration) does not call "
                "on_pre_optimizer_step once per step: use PriorTrainer, or a plain loop with PriorRegularizer"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        added = self._log.entries(logs, self.log_key)
        if added:
            added.update(learned_scale_entries(self.regularizer))
        if not added:
            return
        logs.update(added)
        # Trainer.log appended a copy of `logs` to the history before calling the callbacks: patch it too
        history = getattr(state, "log_history", None)
        if history and all(history[-1].get(k) == v for k, v in logs.items() if k not in added):
            history[-1].update(added)


def _unscale_if_needed(optimizer: Any) -> None:
    """Unscale fp16 gradients (GradScaler) before adding the prior's, if the Trainer has not already.

    transformers 5 unscales when it measures ``grad_norm`` just before ``on_pre_optimizer_step``; this
    keeps the callback right where a version does not, using only ``GradScaler``'s public API.
    """
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return
    inner = optimizer
    while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
        inner = inner.optimizer
    try:
        scaler.unscale_(inner)
    except RuntimeError as err:
        if "already been called" not in str(err):
            raise
