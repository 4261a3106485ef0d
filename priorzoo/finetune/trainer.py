r"""``PriorTrainer`` / ``PriorTrainerMixin``: the prior term inside the Trainer's ``compute_loss``.

The objective is the one of :mod:`priorzoo.finetune.loop`: the Trainer's data loss plus ρ·penalty/N with
penalty = ½(w−μ)ᵀΣ⁻¹(w−μ). Unlike :class:`~priorzoo.finetune.PriorCallback`, the term is part of the loss,
so its gradient goes through ``backward`` (and DDP's all-reduce, fp16 loss scaling, ``max_grad_norm``
clipping) together with the data gradient, and the logged ``loss`` includes it.

**Gradient accumulation, exactly once per optimiser step.** In transformers 5.x ``training_step`` divides
the loss returned by ``compute_loss`` by the number of micro-batches G of the current optimiser step
*unless* it counts the loss as already scaled, which it does when ``Trainer.loss_is_scaled_for_ga`` says so,
or (``None``, the default) when the model's ``forward`` takes ``**kwargs`` and ``num_items_in_batch`` is
known, or a ``compute_loss_func`` is set. A model such as ``BertForSequenceClassification`` takes
``**kwargs`` but ignores ``num_items_in_batch``, so its G micro-batch *means* are summed. Whatever happens
to the data term, the mixin adds the prior term only on the last micro-batch of each optimiser step (when
the accelerator is about to synchronise gradients), multiplied by G when ``training_step`` is going to
divide by G and by 1 otherwise; the parameters do not change between micro-batches, so the step receives
exactly ρ·Σ⁻¹(w−μ)/N. Under DDP every process adds the same term and the all-reduce averages it, so it
also enters once; ``average_tokens_across_devices`` rescales only the data term, inside the base
``compute_loss``, before the prior term is added. The prior term is added only while the model is
training with gradients enabled (evaluation losses are pure data losses). FSDP2 is supported (the prior binds
to the shards when training starts); DeepSpeed, FSDP1 and tensor parallelism are refused (see
:func:`~priorzoo.finetune.callback.check_trainer_setup`).

The logs gain ``prior_term`` (mean ρ·penalty/N over the steps since the last log) and, at the end,
``train_prior_term``.

Example:
    >>> from transformers import TrainingArguments  # doctest: +SKIP
    >>> from priorzoo.finetune import PriorTrainer
    >>> trainer = PriorTrainer(model=model, args=TrainingArguments("out"), train_dataset=train,  # doctest: +SKIP
    ...                        prior=prior, num_train_examples=len(train))
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import Trainer, TrainerCallback
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'priorzoo.finetune.PriorTrainer needs transformers: pip install "priorzoo[transformers]"'
    ) from _err

from priorzoo.binding.matching import Patterns
from priorzoo.binding.options import BindOptions
from priorzoo.binding.sharded import check_parameters
from priorzoo.finetune.callback import (
    PriorCallback,
    _PriorTermLog,
    _unscale_if_needed,
    check_trainer_setup,
    learned_scale_entries,
    num_train_examples_of,
    shards_late,
)
from priorzoo.finetune.learned_scale_checkpoint import resume_learned_state, save_to_checkpoint
from priorzoo.finetune.regularizer import PriorRegularizer
from priorzoo.finetune.term import PriorTerm
from priorzoo.prior import PriorModel

__all__ = ["PriorTrainer", "PriorTrainerMixin"]


class PriorTrainerMixin:
    r"""Mix into a ``transformers.Trainer`` subclass to add ρ·penalty/N inside ``compute_loss``.

    Put it *before* the Trainer class: ``class MyTrainer(PriorTrainerMixin, MyBaseTrainer)``. See the
    module docstring for the gradient-accumulation and DDP handling.

    Args (keyword-only, in addition to the Trainer's own):
        prior: the :class:`~priorzoo.PriorModel`.
        num_train_examples: N > 0; default ``len(train_dataset)``.
        prior_weight: ρ > 0 (default 1).
        scale: if given, λ > 0 replaces the prior's covariance scale;
            default: :meth:`PriorModel.resolve_scale` (the ``recommended_scale`` of a learned prior).
            ``"learned"``: learn λ_g per group on the training data (data-emphasized ELBO,
            :mod:`priorzoo.finetune.learned_scale`). The data term then runs at the sample w̄ + σε and the KL
            at w̄, so the KL's gradient is added after the backward, at ``on_pre_optimizer_step`` (as
            ``PriorCallback`` does: it is not clipped by ``max_grad_norm``), not inside ``compute_loss``; the
            logs gain ``prior_term`` (KL/D), ``prior_scale_<group>`` and ``prior_sigma``. Checkpoints carry σ's
            state and a resumed run continues it (:mod:`priorzoo.finetune.learned_scale_checkpoint`).
        prior_groups, prior_sigma_init, prior_sigma_lr, prior_seed: the learned-scale options ``groups``,
            ``sigma_init``, ``sigma_lr``, ``seed`` of :class:`~priorzoo.finetune.PriorRegularizer`.
        prior_include, prior_exclude, prior_exclude_head, prior_allow_partial, prior_dtype: forwarded to
            :meth:`~priorzoo.PriorModel.bind` as ``include``, ``exclude``, ...
        prior_overlap: on a CPU, start computing the prior term in a background thread as soon as the
            weights are final (after the previous optimiser step, or when a step's first micro-batch enters
            ``compute_loss``), overlapped with the forward passes (default True; same result; see
            :meth:`~priorzoo.finetune.PriorRegularizer.prefetch`).

    Raises:
        ValueError: N ≤ 0 (or no ``num_train_examples`` and an unsized dataset), ρ ≤ 0, λ ≤ 0.
        priorzoo.PriorMatchError: the prior does not match the model.
        RuntimeError: DeepSpeed/FSDP/tensor parallelism, or a ``PriorCallback`` also in the callbacks
            (the term would enter twice).

    Example:
        >>> from transformers import Trainer
        >>> class MyTrainer(PriorTrainerMixin, Trainer):
        ...     pass
        >>> MyTrainer.__mro__[1].__name__
        'PriorTrainerMixin'
    """

    prior_log_key = "prior_term"

    def __init__(
        self,
        *args: Any,
        prior: PriorModel,
        num_train_examples: int | None = None,
        prior_weight: float = 1.0,
        scale: float | str | None = None,
        prior_include: Patterns = None,
        prior_exclude: Patterns = None,
        prior_exclude_head: bool = True,
        prior_allow_partial: bool = False,
        prior_dtype: torch.dtype | None = None,
        prior_overlap: bool = True,
        prior_groups: Any = "default",
        prior_sigma_init: float = 1e-3,
        prior_sigma_lr: float = 0.05,
        prior_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        # validate before the (slow) Trainer construction; errors name the keywords as this class spells them
        if not isinstance(prior_overlap, bool):
            raise TypeError(f"`prior_overlap` must be True or False; received {prior_overlap!r}")
        term = PriorTerm(
            num_train_examples=num_train_examples,  # None: len(train_dataset), read below
            prior_weight=prior_weight,
            scale=scale,
            bind=BindOptions(
                include=prior_include,
                exclude=prior_exclude,
                exclude_head=prior_exclude_head,
                allow_partial=prior_allow_partial,
                dtype=prior_dtype,
            ),
            overlap=prior_overlap,
            groups=prior_groups,
            sigma_init=prior_sigma_init,
            sigma_lr=prior_sigma_lr,
            seed=prior_seed,
        )
        prior = term.resolve(prior)
        super().__init__(*args, **kwargs)
        trainer: Any = self
        check_trainer_setup(trainer.args, where=type(self).__name__, gradient_hook=False)
        if any(isinstance(cb, PriorCallback) for cb in trainer.callback_handler.callbacks):
            raise RuntimeError(
                f"{type(self).__name__} already adds the prior term; remove the PriorCallback from `callbacks` "
                "(with both, the prior would enter twice)"
            )
        if term.num_train_examples is None:
            term = term.with_num_train_examples(num_train_examples_of(trainer.train_dataset))
        self.prior = prior
        self.prior_term = term
        self.prior_weight = term.prior_weight
        self.num_train_examples = term.num_train_examples
        self.prior_regularizer: PriorRegularizer | None = None
        if trainer.model is not None:
            if shards_late(trainer.args):  # FSDP shards at train(): match now, bind the shards then
                term.bind.check_match(prior, trainer.model)
            else:
                self._prior_regularizer_for(trainer.model)
        self._prior_log = _PriorTermLog()
        self._prior_added_this_step = 0
        self._prior_resume_from: Any = None
        trainer.add_callback(_PriorStepCheck(self))

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``; the checkpoint it resumes from also restores a learned scale's state.

        An exception inside a step (an interrupt, a failing forward) first waits for the prior term's background
        thread (left running, it aborts the interpreter at exit) and, with a learned scale, puts w̄ back in place
        of the step's sample w̄ + σε, so that the model can still be saved or trained on."""
        self._prior_resume_from = resume_from_checkpoint
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        except BaseException:
            if self.prior_regularizer is not None:
                self.prior_regularizer._discard_prefetch()
            raise

    def _prior_regularizer_for(self, model: torch.nn.Module) -> PriorRegularizer:
        if self.prior_regularizer is None or self.prior_regularizer.model is not model:
            self.prior_regularizer = PriorRegularizer.from_term(self.prior, model, self.prior_term)
        return self.prior_regularizer

    def _prior_loss_multiplier(self, num_items_in_batch: Any) -> int:
        """G if ``training_step`` will divide this micro-batch's loss by G, else 1 (transformers 5.x rule)."""
        trainer: Any = self
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
            ) or getattr(trainer, "compute_loss_func", None) is not None
        if scaled:
            return 1
        steps = getattr(trainer, "current_gradient_accumulation_steps", None)
        return int(steps if steps is not None else trainer.args.gradient_accumulation_steps)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's loss, plus ρ·penalty/N (times G, see the module docstring) on the last micro-batch."""
        trainer: Any = self
        training = model.training and torch.is_grad_enabled()
        if self.prior_term.learned:  # the KL's gradient enters at on_pre_optimizer_step (_PriorStepCheck)
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if training:  # the weights are final until optimizer.step(): compute the term during the forward
            self._prior_regularizer_for(trainer.model).prefetch()
        out = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not training:
            return out
        if not trainer.accelerator.sync_gradients:  # not the last micro-batch of this optimiser step
            return out
        loss, outputs = out if return_outputs else (out, None)
        term = self._prior_regularizer_for(trainer.model)()
        loss = loss + term.to(loss.device) * self._prior_loss_multiplier(num_items_in_batch)
        self._prior_added_this_step += 1
        self._prior_log.add(term)  # stays on the device until logged
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``prior_term`` (and ``train_prior_term`` at the end) to the Trainer's logs."""
        added = self._prior_log.entries(logs, self.prior_log_key)
        if added:
            added.update(learned_scale_entries(self.prior_regularizer))
        logs.update(added)
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class _PriorStepCheck(TrainerCallback):
    """Fails loudly if an optimiser step ended with the prior term added other than exactly once (a guard
    against Trainer versions whose accumulation bookkeeping differs from the one the mixin relies on), and
    starts the next step's prior term in the background after each optimiser step."""

    def __init__(self, trainer: PriorTrainerMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_parameters(model, where=type(self.trainer).__name__)  # FSDP1 / ZeRO-3, from the parameters
        self.trainer._prior_added_this_step = 0
        self.trainer._prior_log.reset()  # a second train() must not average in the first run's terms
        if self.trainer.prior_term.learned:  # a resumed run continues σ, its Adam and the noise stream
            trainer: Any = self.trainer
            reg = self.trainer._prior_regularizer_for(trainer.model)
            resume_learned_state(reg.learned, args, state, explicit=self.trainer._prior_resume_from)

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.prior_regularizer is not None:
            save_to_checkpoint(self.trainer.prior_regularizer.learned, args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.trainer.prior_term.learned:  # the sample w̄ + σε for this step's forward and backward passes
            trainer: Any = self.trainer
            self.trainer._prior_regularizer_for(trainer.model).perturb_()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self.trainer.prior_term.learned:
            return
        trainer: Any = self.trainer
        _unscale_if_needed(optimizer)
        value = self.trainer._prior_regularizer_for(trainer.model).add_to_grad_()  # restores w̄ first
        self.trainer._prior_added_this_step += 1
        self.trainer._prior_log.add(value)

    def on_optimizer_step(self, args, state, control, **kwargs):
        reg = self.trainer.prior_regularizer  # the next step's weights are final: start its prior term
        if reg is not None:
            reg.prefetch()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.prior_regularizer is not None:
            self.trainer.prior_regularizer._discard_prefetch()

    def on_step_end(self, args, state, control, **kwargs):
        added, self.trainer._prior_added_this_step = self.trainer._prior_added_this_step, 0
        if added != 1:
            raise RuntimeError(
                f"{type(self.trainer).__name__} added the prior term {added} time(s) in optimiser step "
                f"{state.global_step}; it must be exactly once. This transformers version does not flag the last "
                "micro-batch of a step through accelerator.sync_gradients as the mixin expects: use PriorCallback "
                "or a plain loop with PriorRegularizer"
            )


class PriorTrainer(PriorTrainerMixin, Trainer):
    """``transformers.Trainer`` with the prior term in ``compute_loss`` (see :class:`PriorTrainerMixin`).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from priorzoo import PriorModel
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=8, vocab_size=20, num_labels=2))
        >>> backbone = {n.removeprefix("bert."): p.detach().clone()
        ...             for n, p in model.named_parameters() if n.startswith("bert.")}
        >>> prior = PriorModel.from_tensors(backbone, variance=0.01)
        >>> data = [{"input_ids": torch.tensor([1, 2, 3]), "labels": 0}] * 4
        >>> args = TrainingArguments("/tmp/priorzoo-doctest", use_cpu=True, report_to="none", max_steps=1)
        >>> trainer = PriorTrainer(model=model, args=args, train_dataset=data, prior=prior)
        >>> trainer.num_train_examples, len(trainer.prior_regularizer.parameters)
        (4, 23)
    """
