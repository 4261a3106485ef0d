"""The prior's ``config.json``: a validated dataclass with forward-compatible loading.

A prior folder is defined by ``config.json`` plus its safetensors file(s); see ``docs/format.md``. The
config carries everything needed to interpret the tensors: the kind of prior, its rank K, the scale λ and
eps of the density ``N(μ, λ(diag(v) + FᵀF) + eps·I)``, the ordered parameter names and shapes, and
provenance (backbone, source task, how it was learned, which parameters were excluded).

Example:
    >>> from priorzoo.format.config import PriorConfig, ParameterSpec
    >>> cfg = PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (2, 3))])
    >>> cfg.num_parameters
    6
    >>> PriorConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from priorzoo.errors import PriorFormatError
from priorzoo.format.local_paths import is_local_path, strip_local_paths

__all__ = ["FORMAT_VERSION", "REQUIRED_KEYS", "ParameterSpec", "PriorConfig", "PriorKind"]

FORMAT_VERSION = 1
"""The file-format version this release writes and the newest it reads."""

REQUIRED_KEYS = ("format_version", "kind", "rank", "parameters")
"""The keys every prior's ``config.json`` has (a folder whose config lacks them is not a prior)."""


class PriorKind(str, Enum):
    """What kind of Gaussian a prior is (``config.json`` key ``kind``).

    - ``swag``: SWAG Gaussian, diagonal plus rank-K factor (Maddox et al. 2019).
    - ``diagonal``: K = 0, per-parameter variance (e.g. from an empirical Fisher, as in EWC).
    - ``isotropic``: K = 0, one variance σ² everywhere, centred on pre-trained weights (L2-SP).
    - ``laplace``: a Laplace approximation imported from laplace-torch (diagonal).
    """

    SWAG = "swag"
    DIAGONAL = "diagonal"
    ISOTROPIC = "isotropic"
    LAPLACE = "laplace"


def _version() -> str:
    from priorzoo._version import __version__

    return __version__


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter of the prior: its name (as in the source model's ``named_parameters``) and shape."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PriorFormatError(f"parameter `name` must be a non-empty string, received {self.name!r}")
        try:
            if isinstance(self.shape, (str, bytes)) or any(isinstance(s, bool) for s in self.shape):
                raise TypeError
            shape = tuple(operator.index(s) for s in self.shape)  # no float is truncated, no string split
        except TypeError:
            raise PriorFormatError(
                f"parameter `{self.name}` has shape {self.shape!r}; expected a list of non-negative integers"
            ) from None
        if any(s < 0 for s in shape):
            raise PriorFormatError(f"parameter `{self.name}` has a negative dimension in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        """Number of scalar weights in this parameter."""
        return math.prod(self.shape)


def _specs(entries: Any, key: str) -> list[ParameterSpec]:
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise PriorFormatError(f"`{key}` must be a list of {{name, shape}} objects; received {entries!r:.80}")
    specs = []
    for p in entries:
        if isinstance(p, ParameterSpec):
            specs.append(p)
        elif isinstance(p, Mapping) and "name" in p and "shape" in p:
            specs.append(ParameterSpec(p["name"], p["shape"]))
        else:
            raise PriorFormatError(f"each entry of `{key}` needs `name` and `shape`; received {p!r}")
    return specs


@dataclass
class PriorConfig:
    """Validated contents of a prior's ``config.json`` (format_version 1).

    Args:
        kind: one of :class:`PriorKind` (``swag``, ``diagonal``, ``isotropic``, ``laplace``).
        rank: K, the number of rows of the low-rank covariance factor (0 for diagonal priors).
        parameters: ordered :class:`ParameterSpec` list; the density is over their concatenation.
        scale: λ, multiplies the learned covariance (``Σ = λ(diag(v) + FᵀF) + eps·I``); > 0, or ``None``: not
            chosen (absent from ``config.json``): the density uses λ = 1 and fine-tuning the ``recommended_scale``
            (:meth:`priorzoo.PriorModel.resolve_scale`).
        eps: isotropic jitter added to Σ after scaling; ≥ 0.
        backbone: provenance of the weights: ``library`` (``timm``/``transformers``/``torchvision``/``torch``),
            ``name`` (model name or Hub id), ``revision``, ``architecture``, ``pretrained`` (whether pre-trained
            weights were loaded; ``false`` for a random init) and ``hub_id`` (the Hub model they came from:
            the card's ``base_model``).
        source: the source task: ``dataset``, ``objective`` (``supervised``, ``simclr``, ``mlm``, ...), and
            ``hub_id`` (or ``hub_dataset: true`` when ``dataset`` is itself the id) to mark it as a Hub
            dataset (the card's ``datasets``).
        learning: how the prior was learned (SWAG snapshots, learning rate, interval, ...), and where
            ``recommended_scale`` comes from: ``recommended_scale_rule`` (a learner's rule of thumb) or
            ``recommended_scale_measured`` (see :meth:`record_measured_scale`). In ``backbone``, ``source``,
            ``learning`` and ``results`` a local path is kept as its last component only
            (:func:`priorzoo.format.local_paths.strip_local_paths`): these are published with the prior.
        exclude: glob patterns of parameters deliberately left out of the prior (e.g. the head ``fc.*``).
            They are excluded again when the prior is matched onto a model.
        recommended_scale: the λ to fine-tune with by default (measured, or a rule of thumb: see ``learning``).
        license: SPDX id or Hub license name for the card.
        results: results for the model card (list of dicts: dataset, metric, value, role, ...; see
            :mod:`priorzoo.format.card_results`).
        buffers: optional non-trainable tensors the prior carries to reproduce the source solution (the
            running statistics of batch-norm layers, ``"<layer>.running_mean"`` etc.), as
            :class:`ParameterSpec`; stored as ``<name>.buffer`` tensors. Not part of the density. Default
            none (priors written before this key load unchanged).
        format_version: the file-format version; a newer one than this library reads is refused.
        priorzoo_version: the library version that wrote the file.
        save_id: the id of the save that wrote the folder, also in every tensor file's header metadata
            (``priorzoo_save_id``): a reader refuses files of two saves. Set by the writer; ``None`` (priors
            written before it, or built in memory) means no check.

    Example:
        >>> cfg = PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("fc.weight", (3, 4))])
        >>> cfg.to_dict()["rank"]
        2
    """

    kind: PriorKind | str
    rank: int
    parameters: list[ParameterSpec]
    scale: float | None = None
    eps: float = 0.0
    backbone: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    learning: dict[str, Any] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)
    recommended_scale: float | None = None
    license: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    buffers: list[ParameterSpec] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    priorzoo_version: str = field(default_factory=_version)
    save_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            raise PriorFormatError(f"`format_version` must be an integer; received {self.format_version!r}")
        if self.format_version > FORMAT_VERSION:
            raise PriorFormatError(
                f"this prior has format_version {self.format_version}, but priorzoo {_version()} reads "
                f"format_version ≤ {FORMAT_VERSION}; upgrade priorzoo (pip install -U priorzoo)"
            )
        if self.format_version < 1:
            raise PriorFormatError(f"`format_version` must be ≥ 1; received {self.format_version}")
        try:
            self.kind = PriorKind(self.kind)
        except (ValueError, TypeError):
            valid = ", ".join(k.value for k in PriorKind)
            raise PriorFormatError(f"`kind` must be one of {valid}; received {self.kind!r}") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise PriorFormatError(f"`rank` must be an integer ≥ 0; received {self.rank!r}")
        if self.kind is not PriorKind.SWAG and self.rank != 0:
            raise PriorFormatError(
                f"a `{self.kind.value}` prior has no low-rank factor: rank must be 0, got {self.rank}"
            )
        for key in ("scale", "eps"):
            value = getattr(self, key)
            if value is None and key == "scale":
                continue  # λ not chosen: the density uses 1, fine-tuning the recommended_scale
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PriorFormatError(f"`{key}` must be a finite number; received {value!r}")
            setattr(self, key, float(value))
        if self.scale is not None and self.scale <= 0:
            raise PriorFormatError(f"`scale` (λ) must be > 0; received {self.scale!r}")
        if self.eps < 0:
            raise PriorFormatError(f"`eps` must be ≥ 0; received {self.eps!r}")
        if self.recommended_scale is not None:
            rs = self.recommended_scale
            if isinstance(rs, bool) or not isinstance(rs, (int, float)) or not (rs > 0 and math.isfinite(rs)):
                raise PriorFormatError(f"`recommended_scale` must be a finite number > 0; received {rs!r}")
            self.recommended_scale = float(rs)
        specs = _specs(self.parameters, "parameters")
        if not specs:
            raise PriorFormatError("`parameters` is empty: a prior must cover at least one parameter")
        counts = Counter(s.name for s in specs)  # linear: a config may list 100k parameters
        if len(counts) != len(specs):
            dup = sorted(n for n, c in counts.items() if c > 1)
            raise PriorFormatError(f"`parameters` lists these names more than once: {dup[:10]}")
        self.parameters = specs
        self.buffers = _specs(self.buffers, "buffers")
        bcounts = Counter(b.name for b in self.buffers)
        if len(bcounts) != len(self.buffers):
            raise PriorFormatError(
                f"`buffers` lists these names more than once: {sorted(n for n, c in bcounts.items() if c > 1)[:10]}"
            )
        if isinstance(self.exclude, str) or not isinstance(self.exclude, Sequence):
            raise PriorFormatError(f"`exclude` must be a list of glob patterns; received {self.exclude!r}")
        bad = [e for e in self.exclude if not isinstance(e, str)]
        if bad:
            raise PriorFormatError(f"`exclude` must be a list of glob pattern strings; received {bad[:3]!r} in it")
        self.exclude = list(self.exclude)
        for key in ("license", "priorzoo_version", "save_id"):
            value = getattr(self, key)
            if not (isinstance(value, str) or (value is None and key != "priorzoo_version")):
                valid = "a string" if key == "priorzoo_version" else "a string or null"
                raise PriorFormatError(f"`{key}` must be {valid}; received {value!r}")
        for key in ("backbone", "source", "learning"):
            if not isinstance(getattr(self, key), Mapping):
                raise PriorFormatError(f"`{key}` must be a JSON object; received {getattr(self, key)!r}")
            # published provenance records no local path (format.local_paths): a path becomes its last component
            value = dict(getattr(self, key))
            if key == "backbone" and isinstance(value.get("name"), str) and is_local_path(value["name"]):
                value.setdefault("local", True)  # its folder name is no Hub id (the card's base_model)
            setattr(self, key, strip_local_paths(value))
        if not isinstance(self.results, list):
            raise PriorFormatError(f"`results` must be a list of objects; received {self.results!r:.200}")
        self.results = strip_local_paths(self.results)

    # ------------------------------------------------------------------ derived
    @property
    def names(self) -> list[str]:
        """Parameter names in prior order."""
        return [p.name for p in self.parameters]

    @property
    def num_parameters(self) -> int:
        """P, the dimension of the Gaussian."""
        return sum(p.numel for p in self.parameters)

    # ------------------------------------------------------------------ provenance
    def record_measured_scale(self, scale: float, *, measured_on: str) -> None:
        """Recommend a λ measured on a downstream task, and record where, for the model card.

        Sets ``recommended_scale``, writes ``measured_on`` (the task, data and selection it was measured with)
        to ``learning["recommended_scale_measured"]`` and drops ``learning["recommended_scale_rule"]`` (the
        rule of thumb a learner records, which no longer describes the recommended value).

        Raises:
            PriorFormatError: ``scale`` is not a finite number > 0, or ``measured_on`` is empty.

        Example:
            >>> cfg = PriorConfig(kind="swag", rank=0, parameters=[ParameterSpec("w", (2,))], recommended_scale=1e4,
            ...                   learning={"recommended_scale_rule": "... = 10000"})
            >>> cfg.record_measured_scale(3e4, measured_on="validation NLL on my-task (N=60)")
            >>> cfg.recommended_scale, sorted(cfg.learning)
            (30000.0, ['recommended_scale_measured'])
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
            raise PriorFormatError(f"`scale` must be a finite number > 0; received {scale!r}")
        if not isinstance(measured_on, str) or not measured_on.strip():
            raise PriorFormatError(f"`measured_on` must name the task λ was measured on; received {measured_on!r}")
        self.recommended_scale = float(scale)
        self.learning.pop("recommended_scale_rule", None)
        self.learning["recommended_scale_measured"] = measured_on.strip()

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with ``parameters`` as ``[{"name", "shape"}]`` and ``kind`` as a string."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "kind":
                value = self.kind.value
            elif f.name == "save_id" and value is None:
                continue  # written only by a save
            elif f.name == "scale" and value is None:
                continue  # λ not chosen: absent from the file (a reader's default λ is 1)
            elif f.name in ("parameters", "buffers"):
                if f.name == "buffers" and not value:
                    continue  # written only when present: a prior without buffers reads in older releases
                value = [{"name": p.name, "shape": list(p.shape)} for p in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> PriorConfig:
        """Build a config from a parsed ``config.json``.

        Unknown keys (written by a newer priorzoo) are dropped with a warning; a missing required key
        or a newer ``format_version`` raises :class:`~priorzoo.errors.PriorFormatError`.
        """
        if not isinstance(data, Mapping):
            raise PriorFormatError(f"{source}: expected a JSON object, received {type(data).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise PriorFormatError(
                f"{source}: missing required key(s) {missing}; a prior config needs {list(REQUIRED_KEYS)}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        fv = data.get("format_version")
        if isinstance(fv, int) and fv > FORMAT_VERSION:
            # Let __post_init__ raise the clear "newer format" error before anything else.
            return cls(**{k: data[k] for k in data if k in known})
        if unknown:
            warnings.warn(
                f"{source}: ignoring unknown key(s) {unknown} (written by a newer priorzoo?)",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: data[k] for k in data if k in known})

    def to_json_string(self) -> str:
        """Pretty JSON text of :meth:`to_dict` (sorted keys, trailing newline)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, path: str | Path) -> PriorConfig:
        """Read and validate ``config.json`` at ``path`` (opened as a prior's file: a regular file, or a link to
        one inside its folder; see :func:`priorzoo.format.files.open_checked`)."""
        from priorzoo.format.files import read_json

        path = Path(path)
        return cls.from_dict(read_json(path), source=str(path))  # type: ignore[arg-type]
