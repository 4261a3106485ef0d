r"""Source-task objectives for learning a prior: supervised cross-entropy, SimCLR, masked-LM.

Every objective is a callable ``objective(model, batch) -> loss`` (a scalar tensor), so one training loop
(:func:`priorzoo.learn.swag_fit`, a transformers ``Trainer``, your own) runs any of them. An objective that
owns parameters (SimCLR's projection head) is an ``nn.Module``: train its parameters with the backbone's,
but they are *not* part of the prior — only the backbone's weights are collected.

* :class:`CrossEntropyObjective` — supervised classification, ``mean_n −log softmax(f(x_n))[y_n]``;
  works with timm models (logits tensor) and transformers ``*ForSequenceClassification`` (``.logits``).
* :class:`SimCLRObjective` — self-supervised contrastive learning (Chen et al., ICML 2020), the source
  task of the paper's SSL prior (Shwartz-Ziv et al. 2022): two random augmentations of each image,
  backbone features h, projection z = g(h), and the NT-Xent loss (:func:`nt_xent_loss`).
* :class:`MaskedLMObjective` — BERT's masked-language-model loss (Devlin et al. 2019) on the user's text:
  15 % of the tokens are chosen; of those 80 % become ``[MASK]``, 10 % a random token, 10 % stay.

Example:
    >>> import torch
    >>> from priorzoo.learn import CrossEntropyObjective
    >>> model = torch.nn.Linear(4, 3)
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> loss = CrossEntropyObjective()(model, batch)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CrossEntropyObjective",
    "ImageAugment",
    "MaskedLMObjective",
    "ProjectionHead",
    "SimCLRObjective",
    "backbone_features",
    "mask_tokens",
    "nt_xent_loss",
]

_IMAGE_KEYS = ("pixel_values", "image", "images", "x", "input")


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise TypeError(
            f"the model returned {type(output).__name__} without `logits`; CrossEntropyObjective needs class "
            "logits (a tensor, or an output with a `logits` field)"
        )
    return logits


def _inputs_and_labels(batch: Any, label_key: str, input_key: str | None) -> tuple[Any, Tensor]:
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise KeyError(f"the batch has no `{label_key}` entry (keys: {sorted(batch)}); set `label_key`")
        labels = batch[label_key]
        if input_key is not None:
            return batch[input_key], labels
        return {k: v for k, v in batch.items() if k != label_key}, labels
    if isinstance(batch, Sequence) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"expected a batch `(inputs, labels)` or a mapping with `{label_key}`; received {type(batch).__name__}"
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


class CrossEntropyObjective:
    """Supervised cross-entropy: ``mean_n −log p(y_n | x_n, w)``.

    Args:
        label_key: label entry of a mapping batch (``"labels"``, as transformers collators produce).
        input_key: the single input of a mapping batch (e.g. ``"pixel_values"`` for a timm model); by
            default every other entry is passed as keyword arguments (transformers models).
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.

    Example:
        >>> import torch
        >>> obj = CrossEntropyObjective(input_key="pixel_values")
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
        >>> batch = {"pixel_values": torch.zeros(2, 3, 2, 2), "labels": torch.tensor([0, 1])}
        >>> _ = torch.nn.init.zeros_(net[1].weight), torch.nn.init.zeros_(net[1].bias)
        >>> round(obj(net, batch).item(), 4)  # uniform logits over 2 classes: log 2
        0.6931
    """

    def __init__(
        self, *, label_key: str = "labels", input_key: str | None = None, label_smoothing: float = 0.0
    ) -> None:
        self.label_key = label_key
        self.input_key = input_key
        self.label_smoothing = float(label_smoothing)

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, labels = _inputs_and_labels(batch, self.label_key, self.input_key)
        logits = _logits(_call(model, inputs))
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def __repr__(self) -> str:
        return f"CrossEntropyObjective(label_key={self.label_key!r}, input_key={self.input_key!r})"


# ---------------------------------------------------------------------------------------------- SimCLR
def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    r"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

    With u = z/‖z‖ over the 2B projections and s_ij = u_iᵀu_j/τ, the loss of the positive pair (i, j) is
    ``−log exp(s_ij) / Σ_{k≠i} exp(s_ik)``, averaged over all 2B anchors.

    Example:
        >>> import torch
        >>> z = torch.eye(4)
        >>> float(nt_xent_loss(z, z, temperature=0.1)) < 0.01  # identical views, orthogonal negatives
        True
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be [B, D]; received {tuple(z1.shape)} and {tuple(z2.shape)}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0; received {temperature!r}")
    b = z1.shape[0]
    u = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = u @ u.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim.device)
    return F.cross_entropy(sim, targets)


class ProjectionHead(nn.Sequential):
    """SimCLR's projection g(h) = W₂ ReLU(BN(W₁ h)): trained with the backbone, never part of the prior.

    Example:
        >>> import torch
        >>> ProjectionHead(16, 8)(torch.randn(4, 16)).shape
        torch.Size([4, 8])
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> None:
        hidden = hidden_dim or in_dim
        super().__init__(
            nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )


class ImageAugment(nn.Module):
    """SimCLR-style random augmentation of an image batch ``[B, C, H, W]``, in plain torch (no torchvision).

    Per image: a random resized crop (area ∈ ``crop_scale``, aspect ratio ∈ [3/4, 4/3]) resampled to the
    input size, a horizontal flip with probability ½, colour jitter (brightness, contrast, saturation by
    factors in [1 − j, 1 + j]) and grayscale with probability ``grayscale_p``. Pass a ``generator`` for
    reproducible views.

    Example:
        >>> import torch
        >>> aug = ImageAugment()
        >>> aug(torch.rand(2, 3, 8, 8), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self, crop_scale: tuple[float, float] = (0.2, 1.0), jitter: float = 0.4, grayscale_p: float = 0.2
    ) -> None:
        super().__init__()
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"`crop_scale` must satisfy 0 < min ≤ max ≤ 1; received {crop_scale!r}")
        self.crop_scale = (float(lo), float(hi))
        self.jitter = float(jitter)
        self.grayscale_p = float(grayscale_p)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"ImageAugment expects [B, C, H, W]; received shape {tuple(x.shape)}")
        b, c = x.shape[:2]

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator).to(x.device)

        area = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * rand(b)
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(b)
        ratio = log_ratio.exp()
        sx = (area * ratio).sqrt().clamp(max=1.0)
        sy = (area / ratio).sqrt().clamp(max=1.0)
        tx = (1 - sx) * (2 * rand(b) - 1)
        ty = (1 - sy) * (2 * rand(b) - 1)
        flip = torch.where(rand(b) < 0.5, -1.0, 1.0).to(x.device)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = sx * flip
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.jitter > 0:
            j = self.jitter

            def factor() -> Tensor:
                return (1 - j + 2 * j * rand(b)).view(b, 1, 1, 1).to(x.dtype)

            out = out * factor()
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = (out - mean) * factor() + mean
            if c == 3:
                gray = out.mean(dim=1, keepdim=True)
                out = (out - gray) * factor() + gray
        if c == 3 and self.grayscale_p > 0:
            to_gray = (rand(b) < self.grayscale_p).view(b, 1, 1, 1)
            out = torch.where(to_gray, out.mean(dim=1, keepdim=True).expand_as(out), out)
        return out


def backbone_features(output: Any) -> Tensor:
    """A ``[B, D]`` feature tensor from a backbone's output.

    timm models built with ``num_classes=0`` return pooled features; a ``[B, C, H, W]`` map is averaged
    over space and a ``[B, T, D]`` sequence over tokens; transformers outputs give ``pooler_output`` when
    present, else the mean of ``last_hidden_state``.

    Example:
        >>> import torch
        >>> backbone_features(torch.ones(2, 5, 3, 3)).shape
        torch.Size([2, 5])
    """
    if not isinstance(output, Tensor):
        get = output.get if isinstance(output, Mapping) else (lambda k: getattr(output, k, None))
        pooled = get("pooler_output")
        output = pooled if pooled is not None else get("last_hidden_state")
        if output is None:
            raise TypeError("the backbone output has neither `pooler_output` nor `last_hidden_state`")
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() == 3:
        return output.mean(dim=1)
    if output.dim() != 2:
        raise ValueError(f"cannot read [B, D] features from a backbone output of shape {tuple(output.shape)}")
    return output


def _images(batch: Any, input_key: str | None) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        keys = [input_key] if input_key else [k for k in _IMAGE_KEYS if k in batch]
        if not keys or keys[0] not in batch:
            raise KeyError(f"no image entry in the batch (keys: {sorted(batch)}); set `input_key`")
        return batch[keys[0]]
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


class SimCLRObjective(nn.Module):
    """SimCLR: two augmented views per image, backbone features, a projection head, NT-Xent.

    The projection head (``self.head``) is trained together with the backbone but is not part of the
    prior: collect SWAG statistics on the backbone model only (the paper's SSL prior, Shwartz-Ziv et al.
    2022, §4). Labels in the batch, if any, are ignored.

    Args:
        feature_dim: dimension D of the backbone's features (``model.num_features`` for timm).
        projection_dim: output dimension of the projection head (SimCLR uses 128).
        temperature: τ of NT-Xent (SimCLR uses 0.5 at batch size 256–512; 0.1–0.2 for large batches).
        augment: ``x -> view`` (default :class:`ImageAugment`); called twice per batch.
        input_key: image entry of a mapping batch (default: ``pixel_values``/``image``/…).

    Example:
        >>> import torch
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        >>> obj = SimCLRObjective(feature_dim=4, projection_dim=2)
        >>> loss = obj(backbone, torch.rand(6, 3, 8, 8))
        >>> loss.backward()  # gradients reach both the backbone and obj.head
    """

    def __init__(
        self,
        feature_dim: int,
        *,
        projection_dim: int = 128,
        hidden_dim: int | None = None,
        temperature: float = 0.5,
        augment: Callable[[Tensor], Tensor] | None = None,
        input_key: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"`feature_dim` must be a positive integer; received {feature_dim!r}")
        self.head = ProjectionHead(feature_dim, projection_dim, hidden_dim)
        self.temperature = float(temperature)
        self.augment = augment if augment is not None else ImageAugment()
        self.input_key = input_key

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs: Any) -> SimCLRObjective:
        """Build one with ``feature_dim`` read from the backbone (timm ``num_features`` or a transformers
        ``config.hidden_size``).

        Example:
            >>> import timm  # doctest: +SKIP
            >>> obj = SimCLRObjective.for_model(timm.create_model("resnet18", num_classes=0))  # doctest: +SKIP
        """
        dim = getattr(model, "num_features", None)
        if dim is None and getattr(model, "config", None) is not None:
            dim = getattr(model.config, "hidden_size", None)
        if not isinstance(dim, int):
            raise ValueError(
                f"cannot read the feature dimension of {type(model).__name__} (no `num_features` or "
                "`config.hidden_size`); pass SimCLRObjective(feature_dim=...)"
            )
        return cls(dim, **kwargs)

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        x = _images(batch, self.input_key)
        views = torch.cat([self.augment(x), self.augment(x)])
        h = backbone_features(model(views))
        z = self.head(h)
        b = x.shape[0]
        return nt_xent_loss(z[:b], z[b:], self.temperature)


# ---------------------------------------------------------------------------------------------- masked LM
def mask_tokens(
    input_ids: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    special_tokens_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: returns ``(masked_input_ids, labels)`` with labels −100 where no prediction is asked.

    Each non-special token is selected with probability ``probability``; a selected token becomes
    ``mask_token_id`` (80 %), a uniformly random token (10 %) or stays (10 %).

    Example:
        >>> import torch
        >>> ids = torch.arange(10).repeat(4, 1)
        >>> masked, labels = mask_tokens(ids, mask_token_id=0, vocab_size=10, probability=0.5,
        ...                              generator=torch.Generator().manual_seed(0))
        >>> bool(((labels == -100) | (labels == ids)).all())
        True
    """
    if not 0 < probability < 1:
        raise ValueError(f"`probability` must be in (0, 1); received {probability!r}")
    device = input_ids.device

    def rand(shape: torch.Size) -> Tensor:
        return torch.rand(shape, generator=generator).to(device)

    selected = rand(input_ids.shape) < probability
    eligible = torch.ones_like(selected) if special_tokens_mask is None else ~special_tokens_mask.bool()
    selected &= eligible
    if not bool(selected.any()) and bool(eligible.any()):
        # nothing drawn (tiny batch): ask for one prediction so the loss is defined, not NaN
        first = int(eligible.flatten().nonzero()[0])
        selected.view(-1)[first] = True
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    masked = input_ids.clone()
    to_mask = selected & (rand(input_ids.shape) < 0.8)
    masked[to_mask] = mask_token_id
    to_random = selected & ~to_mask & (rand(input_ids.shape) < 0.5)
    random_ids = (rand(input_ids.shape) * vocab_size).long().clamp_(max=vocab_size - 1)
    masked[to_random] = random_ids[to_random]
    return masked, labels


class MaskedLMObjective:
    """Masked-language-model loss of a transformers ``*ForMaskedLM`` model on a tokenised batch.

    The batch is a mapping with ``input_ids`` (and optionally ``attention_mask``, ``token_type_ids``);
    padding (``attention_mask == 0``) and ``special_token_ids`` are never masked. The masking draws from
    the global torch RNG (seed it for reproducibility) unless a ``generator`` is given.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForMaskedLM  # doctest: +SKIP
        >>> model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
        ...                                    num_attention_heads=2, intermediate_size=37))  # doctest: +SKIP
        >>> obj = MaskedLMObjective(mask_token_id=4, vocab_size=100, special_token_ids=(0, 1, 2, 3))
        >>> loss = obj(model, {"input_ids": torch.randint(5, 100, (2, 12))})  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        mask_token_id: int,
        vocab_size: int,
        probability: float = 0.15,
        special_token_ids: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> None:
        self.mask_token_id = int(mask_token_id)
        self.vocab_size = int(vocab_size)
        self.probability = float(probability)
        self.special_token_ids = tuple(int(t) for t in special_token_ids)
        self.generator = generator

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, probability: float = 0.15, **kwargs: Any) -> MaskedLMObjective:
        """Read ``mask_token_id``, the vocabulary size and the special tokens from a transformers tokenizer.

        Example:
            >>> obj = MaskedLMObjective.from_tokenizer(tokenizer)  # doctest: +SKIP
        """
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; masked-LM needs one (e.g. BERT's [MASK])")
        return cls(
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            probability=probability,
            special_token_ids=tuple(tokenizer.all_special_ids),
            **kwargs,
        )

    def __call__(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("MaskedLMObjective needs a mapping batch with `input_ids`")
        ids = batch["input_ids"]
        special = torch.zeros_like(ids, dtype=torch.bool)
        for t in self.special_token_ids:
            special |= ids == t
        if "attention_mask" in batch:
            special |= batch["attention_mask"] == 0
        if bool(special.all()):
            raise ValueError(
                "every token of the batch is special or padding, so masked-LM has nothing to predict; does the "
                "tokenizer map the text to [UNK] only (wrong vocabulary), or is `special_token_ids` too broad?"
            )
        masked, labels = mask_tokens(
            ids,
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            probability=self.probability,
            special_tokens_mask=special,
            generator=self.generator,
        )
        kwargs = {k: v for k, v in batch.items() if k in ("attention_mask", "token_type_ids")}
        out = model(input_ids=masked, labels=labels, **kwargs)
        loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise TypeError(f"{type(model).__name__} returned no `loss`; use a transformers *ForMaskedLM model")
        return loss
