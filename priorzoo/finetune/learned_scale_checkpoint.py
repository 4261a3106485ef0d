r"""The learned scale's state in a Trainer checkpoint: σ, its Adam state and the noise stream survive ``--resume``.

A Trainer checkpoint ``checkpoint-<step>/`` holds the weights, their optimiser and the RNG states, but not the
state of :class:`~priorzoo.finetune.learned_scale.LearnedScale`: ρ (σ = softplus(ρ)), σ's own Adam state, the
generator of the noise ε and the last solved λ_g. Without them a resumed run restarts σ from ``sigma_init``.
``PriorCallback`` and ``PriorTrainer`` (``scale="learned"``) write them at every ``on_save`` into
``checkpoint-<step>/`` + :data:`STATE_FILE` (safetensors: the tensors, and JSON metadata for the groups and the
step), and read them back at ``on_train_begin`` when the Trainer resumes (its ``state.global_step`` > 0), so that
2 steps + checkpoint + resume + 2 steps equal 4 uninterrupted steps.

The checkpoint read is, in order: the folder given to ``PriorTrainer.train(resume_from_checkpoint=...)``,
``TrainingArguments.resume_from_checkpoint`` (a folder), else ``<output_dir>/checkpoint-<global_step>`` (what
``resume_from_checkpoint=True`` picks). A missing file, a file saved at another step or for other groups, or a
non-finite value is refused with the reason: resuming with σ silently reset is the failure this module exists
to prevent.

**Distributed runs (DDP, FSDP2).** The state is the same on every process, bit for bit: under DDP every process
draws the same ε from one identically seeded generator and σ's gradient Σ ε·∂NLL/∂w is read from the all-reduced
gradients; under FSDP2 every process draws the same global ε and perturbs its slice, and the group sums (r_gᵀS_g⁻¹r_g,
‖w_head‖², Σ ε·∂NLL/∂w) are all-reduced, so ρ, σ's Adam state, the generator and λ_g agree. So one file per checkpoint
is right: it is written by the processes the Trainer lets write its own checkpoint files (``args.should_save``:
world rank 0, or each node's local rank 0 with ``save_on_each_node``), atomically (a temporary file moved in with
``os.replace``, so that two nodes writing the same content to a shared folder never leave a partial file), and read
by every process at resume. (transformers 5.25's ``save_pretrained`` writes the model's weights on world rank 0
only, so with ``save_on_each_node`` and no shared storage the Trainer's own resume fails on the other nodes.)

Example:
    >>> import tempfile, torch
    >>> from priorzoo import PriorModel
    >>> from priorzoo.finetune.learned_scale import LearnedScale
    >>> lin = torch.nn.Linear(2, 2)
    >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0, exclude=["bias"])
    >>> learned = LearnedScale(prior, lin, num_train_examples=4, sigma_init=0.1)
    >>> folder = tempfile.mkdtemp()
    >>> path = save_learned_state(learned, folder, global_step=3)
    >>> other = LearnedScale(prior, lin, num_train_examples=4, sigma_init=0.5)
    >>> load_learned_state(other, folder, global_step=3)
    >>> other.sigma == learned.sigma
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from priorzoo.finetune.learned_scale import LearnedScale

__all__ = ["STATE_FILE", "load_learned_state", "resume_learned_state", "save_learned_state", "save_to_checkpoint"]

STATE_FILE = "learned_scale.safetensors"
"""The file, in each ``checkpoint-<step>/`` folder, that holds the learned scale's state."""

_FORMAT = "priorzoo.learned_scale.v1"
_OPT = "sigma_optimizer."


def save_learned_state(learned: LearnedScale, folder: str | os.PathLike, *, global_step: int | None = None) -> Path:
    """Write :meth:`LearnedScale.state_dict` to ``folder/STATE_FILE`` (created if needed), atomically; return the
    path.

    ``global_step`` (the Trainer's) is recorded and checked by :func:`load_learned_state`.
    """
    from priorzoo.learn.checkpoint import atomic_save_file

    state = learned.state_dict()
    opt = state["sigma_optimizer"]["state"].get(0, {})
    tensors = {
        "rho": state["rho"].cpu(),
        "generator": state["generator"].cpu(),
        **{_OPT + k: torch.as_tensor(v).detach().cpu() for k, v in opt.items()},
    }
    meta = {
        "format": _FORMAT,
        "groups": json.dumps(state["groups"]),
        "step": str(state["step"]),
        "scales": json.dumps(state["scales"]),  # JSON floats round-trip exactly (repr)
        "last_kl": json.dumps(state["last_kl"]),
        "global_step": json.dumps(global_step),
    }
    return atomic_save_file(tensors, Path(folder) / STATE_FILE, meta)


def load_learned_state(learned: LearnedScale, folder: str | os.PathLike, *, global_step: int | None = None) -> None:
    """Read ``folder/STATE_FILE`` into ``learned`` (validated: see :meth:`LearnedScale.load_state_dict`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a priorzoo learned-scale file, saved at a ``global_step`` other than the one given, or
            a state :meth:`LearnedScale.load_state_dict` refuses (the message names ``path``).
    """
    from safetensors import safe_open

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no learned-scale state `{path}`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        if meta.get("format") != _FORMAT:
            raise ValueError(f"`format` is {meta.get('format')!r}; expected {_FORMAT!r}")
        saved_step = json.loads(meta["global_step"])
        if global_step is not None and saved_step != global_step:
            raise ValueError(f"saved at global step {saved_step}; the Trainer resumes at global step {global_step}")
        template = learned.sigma_optimizer.state_dict()
        opt = {k.removeprefix(_OPT): v for k, v in tensors.items() if k.startswith(_OPT)}
        state = {
            "rho": tensors.get("rho"),
            "generator": tensors.get("generator"),
            "sigma_optimizer": {"state": {0: opt} if opt else {}, "param_groups": template["param_groups"]},
            "groups": json.loads(meta["groups"]),
            "step": int(meta["step"]),
            "scales": json.loads(meta["scales"]),
            "last_kl": json.loads(meta["last_kl"]),
        }
        if state["rho"] is None or state["generator"] is None:
            raise ValueError("the tensors `rho` and `generator` are required")
        learned.load_state_dict(state)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"learned-scale state `{path}` refused: {err}") from None


def _checkpoint_folder(args: Any, state: Any, explicit: Any) -> Path:
    for candidate in (explicit, getattr(args, "resume_from_checkpoint", None)):
        if isinstance(candidate, (str, os.PathLike)) and os.path.isdir(candidate):
            return Path(candidate)
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def resume_learned_state(learned: LearnedScale | None, args: Any, state: Any, *, explicit: Any = None) -> None:
    """At ``on_train_begin``: if the Trainer resumes (``state.global_step`` > 0), load the learned scale's state
    from its checkpoint (see the module docstring for which folder); nothing for a fixed scale or a fresh run.

    Raises:
        RuntimeError: resuming with a learned scale and no state file in that checkpoint.
        ValueError: a state file that is refused (see :func:`load_learned_state`).
    """
    if learned is None or not getattr(state, "global_step", 0):
        return
    folder = _checkpoint_folder(args, state, explicit)
    if not (folder / STATE_FILE).is_file():
        raise RuntimeError(
            f"the Trainer resumes at global step {state.global_step} with scale='learned', but `{folder / STATE_FILE}` "
            "does not exist, so σ, its Adam state and the noise stream would restart from their initial values. "
            "Resume from a checkpoint written by priorzoo's PriorCallback/PriorTrainer; if it is not in output_dir, "
            "name it in TrainingArguments(resume_from_checkpoint=...)"
        )
    load_learned_state(learned, folder, global_step=state.global_step)


def _writes_checkpoints(args: Any, state: Any) -> bool:
    """Whether this process writes the Trainer's checkpoint files: ``TrainingArguments.should_save`` (world rank 0,
    or each node's local rank 0 with ``save_on_each_node``), else ``state.is_world_process_zero``."""
    should = getattr(args, "should_save", None)
    if isinstance(should, bool):
        return should
    return bool(getattr(state, "is_world_process_zero", True))


def save_to_checkpoint(learned: LearnedScale | None, args: Any, state: Any) -> None:
    """At ``on_save``: write the learned scale's state into ``<output_dir>/checkpoint-<global_step>/`` on the
    processes that write the Trainer's checkpoint files (``args.should_save``; without it, world rank 0): the state
    is the same on every process.

    Example:
        >>> import tempfile, torch
        >>> from types import SimpleNamespace
        >>> from priorzoo import PriorModel
        >>> lin = torch.nn.Linear(2, 2)
        >>> prior = PriorModel.from_tensors({"weight": torch.zeros(2, 2)}, variance=1.0, exclude=["bias"])
        >>> learned = LearnedScale(prior, lin, num_train_examples=4)
        >>> out, state = tempfile.mkdtemp(), SimpleNamespace(global_step=2, is_world_process_zero=False)
        >>> save_to_checkpoint(learned, SimpleNamespace(output_dir=out, should_save=False), state)
        >>> (Path(out) / "checkpoint-2").exists()
        False
        >>> save_to_checkpoint(learned, SimpleNamespace(output_dir=out, should_save=True), state)  # another node
        >>> [p.name for p in (Path(out) / "checkpoint-2").iterdir()]
        ['learned_scale.safetensors']
    """
    if learned is None or not _writes_checkpoints(args, state):
        return
    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
    save_learned_state(learned, folder, global_step=state.global_step)
