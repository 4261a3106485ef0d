r"""Priors on FSDP2-sharded models: each process binds the slice of the prior for its own shards.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor`` with its original
name and global shape, of which a process holds one slice (``Shard(d)`` on a 1-D device mesh; slices may be
uneven or empty). The Woodbury penalty shards exactly. With r_p = w_p − μ_p, s_p = A_p⁻¹r_p on process p,

.. math::

    r^\top\Sigma^{-1}r = \sum_p r_p^\top s_p - t^\top M t, \qquad t = \sum_p F_p s_p, \qquad
    M = \lambda C^{-1}, \qquad C = I + \lambda \sum_p F_p A_p^{-1} F_p^\top,

    (\Sigma^{-1} r)_p = s_p - A_p^{-1} F_p^\top M t ,

so each process needs only its slice of μ, v and F (memory (K + 2)·P/W), one all-reduce of the K×K
capacitance (plus log det A and P) at bind, and one all-reduce of K + 1 numbers (Σ rᵀs and t) per
evaluation; the value is then exact on every process and each process's gradient is the exact slice of
Σ⁻¹(w − μ) for its shard (Shwartz-Ziv et al., "Pre-Train Your Loss", NeurIPS 2022; the SWAG covariance of
Maddox et al., 2019). :class:`ShardedBoundPrior` is what :meth:`priorzoo.PriorModel.bind` returns for such a
model, so :class:`~priorzoo.finetune.PriorRegularizer`, ``PriorCallback`` and ``PriorTrainer`` work on it
unchanged; :func:`open_prior` opens a prior folder so that binding reads only each process's slices
(safetensors ``get_slice``), never a whole file.

Refused, from the parameters themselves (:func:`check_parameters`): FSDP1 (``FullyShardedDataParallel``'s
flattened ``FlatParameter`` s, whose names and shapes are not the prior's) and DeepSpeed ZeRO-3 (parameters
partitioned into empty placeholders with ``ds_*`` attributes).

Example:
    >>> import torch
    >>> from priorzoo.binding.sharded import is_sharded
    >>> is_sharded(list(torch.nn.Linear(2, 2).parameters()))
    False
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from priorzoo.binding.bound import BindablePrior, BoundPrior, register_binding
from priorzoo.binding.matching import MatchResult
from priorzoo.errors import PriorFormatError, PriorNotFoundError
from priorzoo.format.checks import check_prior_tensors, check_values
from priorzoo.format.files import open_checked
from priorzoo.format.tensorfile import TensorFile

if TYPE_CHECKING:
    from priorzoo.prior import PriorModel

__all__ = ["LazyTensor", "ShardedBoundPrior", "check_parameters", "is_sharded", "local_slices", "open_prior"]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def is_sharded(parameters: Sequence[Tensor]) -> bool:
    """Whether any of ``parameters`` is a ``DTensor`` (FSDP2 / ``fully_shard``).

    Example:
        >>> import torch
        >>> is_sharded([torch.nn.Parameter(torch.zeros(2))])
        False
    """
    return any(_is_dtensor(p) for p in parameters)


def check_parameters(model: torch.nn.Module, *, where: str = "priorzoo") -> None:
    """Refuse models whose parameters a prior cannot be matched onto: FSDP1 and DeepSpeed ZeRO-3.

    Decided from the modules and parameters themselves (not from environment variables or launcher
    settings): an FSDP1 ``FullyShardedDataParallel`` module or ``FlatParameter``; a DeepSpeed ZeRO-3
    parameter (``ds_id``/``ds_numel`` attributes, partitioned into a placeholder).

    Raises:
        RuntimeError: naming the parameter and what to use instead.

    Example:
        >>> import torch
        >>> check_parameters(torch.nn.Linear(2, 2))  # a plain model: nothing to refuse
    """
    for module_name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise RuntimeError(
                f"{where}: `{module_name or 'the model'}` is wrapped in FSDP1 (FullyShardedDataParallel), which "
                "flattens parameters into FlatParameters whose names and shapes are not the prior's. Shard with "
                "FSDP2 instead (torch.distributed.fsdp.fully_shard; Trainer: fsdp_config={'fsdp_version': 2})"
            )
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or "_flat_param" in name:
            raise RuntimeError(
                f"{where}: parameter `{name}` is an FSDP1 FlatParameter (flattened and sharded); shard with FSDP2 "
                "(torch.distributed.fsdp.fully_shard) so that parameters keep their names and shapes"
            )
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel"):
            raise RuntimeError(
                f"{where}: parameter `{name}` is partitioned by DeepSpeed ZeRO-3 (local placeholder of shape "
                f"{tuple(p.shape)}, {getattr(p, 'ds_numel', '?')} elements in all); the prior cannot be matched "
                "onto it. Use ZeRO stage ≤ 2, or FSDP2 (torch.distributed.fsdp.fully_shard)"
            )


def local_slices(p: Tensor) -> tuple[slice, ...]:
    """The index of this process's slice of a ``DTensor`` parameter in its global shape (all of a plain one).

    Example:
        >>> import torch
        >>> local_slices(torch.zeros(3, 2))
        (slice(0, 3, None), slice(0, 2, None))
    """
    if not _is_dtensor(p):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = p.device_mesh
    if mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
        raise RuntimeError(
            f"a sharded prior needs parameters sharded on a 1-D device mesh (FSDP2's default); this one has "
            f"mesh shape {tuple(mesh.shape)} and placements {p.placements} (HSDP/tensor parallelism are not supported)"
        )
    shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _local(p: Tensor) -> Tensor:
    return p.to_local() if _is_dtensor(p) else p


def _all_reduce_sum(group: Any) -> Any:
    import torch.distributed as dist

    def reduce(x: Tensor) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    return reduce


class ShardedBoundPrior(BoundPrior):
    """A prior bound to an FSDP2 model: this process's slices of μ, v, F for its parameter shards.

    Same interface as :class:`~priorzoo.BoundPrior`; :meth:`penalty` and :meth:`value_and_grad` are
    collective (every process of the mesh must call them, in the same order) and give the exact global
    value on every process; gradients and ``tensors`` are *local shards* (``p.to_local()``).

    Example:
        >>> # under torchrun, after torch.distributed.fsdp.fully_shard(model):
        >>> bound = prior.bind(model)  # doctest: +SKIP
        >>> reg = PriorRegularizer(open_prior("./my-prior"), model, num_train_examples=N)  # doctest: +SKIP
    """

    def __init__(
        self, prior: BindablePrior, model: torch.nn.Module, match: MatchResult, *, dtype: torch.dtype | None = None
    ) -> None:
        self._take_matched(prior, model, match)
        unsharded = [n for n, p in zip(self.prior_names, self.parameters) if not _is_dtensor(p)]
        if unsharded:
            raise RuntimeError(
                f"some matched parameters are sharded (FSDP2 DTensors) and some are not (e.g. `{unsharded[0]}`); "
                "apply fully_shard to the whole model (its root) so that every matched parameter is sharded"
            )
        mesh = self.parameters[0].device_mesh
        if any(p.device_mesh != mesh for p in self.parameters):
            raise RuntimeError("the matched parameters are sharded over different device meshes; use one mesh")
        self.device = self.parameters[0].to_local().device
        self.slices = [local_slices(p) for p in self.parameters]
        self._signature = self._current_signature()
        cf = prior.cov_factor
        names = self.prior_names

        def part(t: Any, index: tuple[slice, ...]) -> Tensor:
            return t[index] if index else t[...]

        from priorzoo.gaussian import LowRankGaussian

        mean = [part(prior.mean[n], sl) for n, sl in zip(names, self.slices)]
        self.gaussian = LowRankGaussian(  # this process's slices; sums over processes by all-reduce
            mean,
            [part(prior.variance[n], sl) for n, sl in zip(names, self.slices)],
            [part(cf[n], (slice(None), *sl)) for n, sl in zip(names, self.slices)] if cf is not None else None,
            scale=prior.scale,
            eps=prior.eps,
            names=names,
            dtype=dtype or torch.promote_types(mean[0].dtype, torch.float32),
            device=self.device,
            reduce=_all_reduce_sum(mesh.get_group()),
        )

    def _blocks(self, tensors: Sequence[Tensor] | None) -> Sequence[Tensor]:
        if tensors is None:
            return [p.to_local() for p in self.parameters]
        if isinstance(tensors, Tensor) or len(tensors) != len(self.prior_names):
            raise ValueError(
                f"`tensors` must be a sequence of {len(self.prior_names)} local shards, one per prior parameter in "
                "`bound.prior_names` order"
            )
        for name, t, p in zip(self.prior_names, tensors, self.parameters):
            want = tuple(p.to_local().shape)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"`tensors` entry for `{name}` must be its local shard of shape {want}; received {tuple(t.shape)}"
                )
        return tensors


register_binding(ShardedBoundPrior, claims=is_sharded, check=check_parameters)  # PriorModel.bind dispatches here


class LazyTensor:
    """A tensor of a safetensors file read only when (and as far as) it is indexed: ``t[a:b]`` reads rows
    a..b (only the pages that hold them), ``t[...]`` the whole tensor. Has ``shape``, ``dtype`` and ``device``
    (cpu). Every part read is checked (finite; ≥ 0 for a variance) before it is returned. The file is the one
    opened when the tensor was made: a later save into the folder does not change what it reads.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/t.safetensors"
        >>> save_file({"x": torch.arange(6.0).reshape(3, 2)}, path)
        >>> LazyTensor(path, "x")[1:2].tolist()
        [[2.0, 3.0]]
    """

    device = torch.device("cpu")

    def __init__(self, source: str | os.PathLike | TensorFile, key: str, *, nonneg: bool = False) -> None:
        if not isinstance(source, TensorFile):
            source = TensorFile(open_checked(source), str(source))
        if key not in source.entries:
            raise PriorFormatError(f"{source.where}: no tensor `{key}` in it")
        self.file = source
        self.path = source.where
        self.key = key
        self.nonneg = nonneg
        dtype, shape, _ = source.entries[key]
        self.shape = torch.Size(shape)
        self.dtype = dtype

    def __getitem__(self, index: Any) -> Tensor:
        if not isinstance(index, tuple) and index is not Ellipsis:
            index = (index,)
        out = self.file.read(self.key, None if index is Ellipsis or len(self.shape) == 0 else index)
        check_values(self.key, out, nonneg=self.nonneg)
        return out

    def detach(self) -> Tensor:
        """The whole tensor, read now (for code that needs a real tensor)."""
        return self[...]

    def numel(self) -> int:
        return self.shape.numel()

    def dim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={tuple(self.shape)}, dtype={self.dtype}, file={Path(self.path).name!r})"


def open_prior(pretrained: str | os.PathLike, **hub_kwargs: Any) -> PriorModel:
    """A :class:`~priorzoo.PriorModel` whose tensors are :class:`LazyTensor` s: binding it to an FSDP2 model
    reads only this process's slices, never a whole file.

    Meant for sharded binding (``PriorRegularizer(open_prior(path), fsdp_model, ...)``); an unsharded
    binding reads each tensor whole, once. The folder is read as :meth:`~priorzoo.PriorModel.from_pretrained`
    reads it (:func:`priorzoo.format.serialization.open_prior_folder`: the visible files only, regular files in the
    folder, the save-id check, each tensor in its shard, nothing missing or foreign), and the same checks of the
    tensors apply: names, shapes and dtypes against the config here, the values of each slice as it is read
    (finite, variance ≥ 0); the batch-norm buffers are read and checked whole. ``pretrained`` is a folder or a
    Hub id (``hub_kwargs`` as in :meth:`~priorzoo.PriorModel.from_pretrained`).

    Example:
        >>> import tempfile, torch
        >>> from priorzoo import PriorModel
        >>> folder = PriorModel.from_tensors({"w": torch.zeros(4, 2)}, variance=1.0).save_pretrained(tempfile.mkdtemp())
        >>> lazy = open_prior(folder)
        >>> lazy.mean["w"][2:4].shape
        torch.Size([2, 2])
    """
    from priorzoo.format.serialization import BUFFER_SUFFIX, SUFFIXES, open_prior_folder
    from priorzoo.prior import PriorModel

    folder = Path(pretrained)
    if os.fspath(pretrained) == "":
        raise PriorNotFoundError("`pretrained` is empty: pass a prior folder or a Hub repo id ('org/name')")
    if not folder.is_dir():
        from priorzoo.hub import download_prior

        folder = Path(download_prior(str(pretrained), **hub_kwargs))
    opened = open_prior_folder(folder)
    try:
        lazy = {
            s: {n: LazyTensor(f, key, nonneg=s == "variance") for n, (f, key) in opened.tensors[s].items()}
            for s in SUFFIXES
        }
        buffers = opened.read(BUFFER_SUFFIX)
        config = opened.prior_config()
        check_prior_tensors(config, lazy["mean"], lazy["variance"], lazy["cov_factor"] or None, buffers, values=False)
    except BaseException:
        opened.close()
        raise
    return PriorModel(
        config, lazy["mean"], lazy["variance"], lazy["cov_factor"] or None, buffers=buffers, validate=False
    )
