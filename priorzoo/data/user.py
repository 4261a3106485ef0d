"""Read training data for learning and fine-tuning: one loader, one label-ordering rule, clear errors.

:func:`load_data` reads a ``datasets.Dataset`` from a local folder (``save_to_disk`` output, or an image
folder ``<class>/<image>``), a CSV/TSV, JSON(L) or parquet file, or — online — a Hub dataset id. CSV files are
checked row by row first: a row with another number of fields than the header is an error naming its line
(``datasets`` would otherwise shift the columns silently or fail deep inside pyarrow).

:class:`Columns` finds the input column (image or text, plus an optional text pair) and the label column,
and maps labels to class ids with **one rule**, used by ``priorzoo learn``, ``priorzoo finetune``, the demo
and the zoo recipes alike:

- a ``datasets.ClassLabel`` column: its own names, in its order;
- integers ≥ 0: class i is the integer i (names ``"0"`` … ``"max"``);
- anything else (strings, floats, mixed): the distinct values sorted by their text (``str``).

Empty label cells (``None``, or a string of whitespace only) are an error naming the column and the first
rows, never a class of their own. :meth:`Columns.check_classification` refuses one class or one example.

**One input pipeline.** :func:`image_input` reads the input size and normalisation from the backbone's own
configuration (timm's ``pretrained_cfg``, a transformers folder's ``preprocessor_config.json``; ImageNet's for
torchvision), and :func:`make_collate` turns rows into the batches every trainer of priorzoo takes: a dict
with ``pixel_values`` (images) or the tokenizer's tensors (text), plus ``labels``. ``priorzoo learn``,
``priorzoo finetune`` and the demo all build their batches here, so a prior is learned and used on the same
inputs.

Example:
    >>> import datasets
    >>> ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    >>> cols = Columns(ds)
    >>> cols.text, cols.label, cols.names, [cols.label_id(v) for v in ds["label"]]
    ('text', 'label', ['neg', 'pos'], [1, 0, 1])
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Columns",
    "ImageInput",
    "check_csv_rows",
    "image_input",
    "image_tensor",
    "load_data",
    "make_collate",
]

DATA_FORMATS = ("auto", "disk", "imagefolder", "csv", "json", "parquet", "hub")
"""The ``data_format`` choices of :func:`load_data` (``--data-format`` of the CLI)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def check_csv_rows(path: str | os.PathLike, *, delimiter: str = ",") -> int:
    """Check that every row of a CSV/TSV file has as many fields as its header; returns the data rows.

    Raises:
        ValueError: an empty file, or a row with another number of fields (the message names the line, the
            count and the header's count).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.csv")
        >>> _ = open(path, "w").write("text,label\\na,0\\nb,1,extra\\n")
        >>> check_csv_rows(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `d.csv` line 3 has 3 fields, but the header (text, label) has 2: ...
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise ValueError(f"`{path.name}` is empty: a CSV needs a header row naming the columns")
        rows = 0
        for row in reader:
            if not row:  # a blank line
                continue
            rows += 1
            if len(row) != len(header):
                raise ValueError(
                    f"`{path.name}` line {reader.line_num} has {len(row)} fields, but the header "
                    f"({', '.join(header)}) has {len(header)}: a row with uneven fields would shift the columns; "
                    "fix the file (quote fields that contain the delimiter)"
                )
    return rows


def load_data(data: str | os.PathLike, *, data_format: str = "auto", split: str = "train") -> Any:
    """Load a ``datasets.Dataset`` from a local folder/file, or a Hub dataset id (``data_format="hub"``/auto).

    Args:
        data: a folder (``save_to_disk`` output or an image folder), a ``.csv``/``.tsv``/``.json``/``.jsonl``/
            ``.parquet`` file, or a Hub dataset id.
        data_format: one of :data:`DATA_FORMATS` (``auto`` tells it from the path).
        split: the split of a ``DatasetDict``.

    Raises:
        ValueError: unknown file type, uneven CSV rows, a missing split, a Hub id that cannot be loaded.

    Example:
        >>> import datasets, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.csv")
        >>> _ = open(path, "w").write("text,label\\na,0\\nb,1\\n")
        >>> list(load_data(path)["label"])
        [0, 1]
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"`data_format` must be one of {', '.join(DATA_FORMATS)}; received {data_format!r}")
    from priorzoo.learn._common import require

    datasets = require("datasets", what="reading training data")
    path = Path(data)
    fmt = data_format
    if fmt == "auto":
        if path.is_dir():
            saved = (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
            fmt = "disk" if saved else "imagefolder"
        elif path.is_file():
            fmt = _FILE_BUILDERS.get(path.suffix.lower(), "")
            if not fmt:
                raise ValueError(
                    f"`--data` {str(data)!r}: cannot tell the format of `{path.suffix}` files; valid: "
                    f"{sorted(_FILE_BUILDERS)} or a folder (pass --data-format)"
                )
        else:
            fmt = "hub"
    if fmt in ("disk", "imagefolder", "csv", "json", "parquet") and not path.exists():
        raise FileNotFoundError(f"`--data` {str(data)!r} does not exist (format {fmt})")
    if fmt == "disk":
        ds = datasets.load_from_disk(str(path))
    elif fmt == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    elif fmt == "hub":
        try:
            ds = datasets.load_dataset(str(data))
        except Exception as err:  # wrap whatever the Hub/network raised
            raise ValueError(
                f"`--data` {str(data)!r} is not a local file or folder, and loading it as a Hub dataset failed "
                f"({err}); offline, pass a local folder / CSV / JSON / parquet file"
            ) from None
    else:
        kwargs: dict[str, Any] = {}
        if fmt == "csv":
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            check_csv_rows(path, delimiter=delimiter)
            if delimiter != ",":
                kwargs["delimiter"] = delimiter
        ds = datasets.load_dataset(fmt, data_files=str(path), **kwargs)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"the dataset has no split {split!r}; splits: {sorted(ds)} (pass --split)")
        ds = ds[split]
    return ds


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class Columns:
    """Which columns hold the inputs and labels, and how labels map to class ids (shared by all splits).

    Args:
        ds: the training ``datasets.Dataset``.
        image, text, text_pair, label: column names (default: the first ``Image`` column; else ``text`` or
            the first string column that is not the label; ``label`` or ``labels``).
        others: evaluation splits whose label values join the label space (same rule, one mapping).
        need_label: a label column is required (supervised); otherwise it is optional (``simclr``/``mlm``).

    Attributes:
        image, text, text_pair, label: the column names (``None`` when absent).
        names: class names in class-id order (empty without a label column); ``num_labels``.
        modality: ``"image"`` or ``"text"``.

    Raises:
        ValueError: a named column that does not exist, no input column, no label column when needed, empty
            label cells, negative integer labels, a split without the label column.
    """

    def __init__(
        self,
        ds: Any,
        *,
        image: str | None = None,
        text: str | None = None,
        text_pair: str | None = None,
        label: str | None = None,
        others: Sequence[Any] = (),
        need_label: bool = True,
    ) -> None:
        import datasets

        feats = ds.features
        self.label = label or next((k for k in ("label", "labels") if k in feats), None)
        self.image = image or next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
        self.text = text
        if self.image is None and self.text is None:
            strings = [k for k, f in feats.items() if getattr(f, "dtype", None) in ("string", "large_string")]
            strings = [k for k in strings if k != self.label and k not in ("label", "labels")]
            self.text = "text" if "text" in strings else (strings[0] if strings else None)
        self.text_pair = text_pair
        for flag, col in (
            ("--image-column", self.image),
            ("--text-column", self.text),
            ("--text-pair-column", self.text_pair),
            ("--label-column", self.label),
        ):
            if col is not None and col not in feats:
                raise ValueError(f"`{flag}` {col!r} is not a column of the training data; columns: {sorted(feats)}")
        if self.image is None and self.text is None:
            raise ValueError(f"no image or text column in {sorted(feats)}; pass --image-column / --text-column")
        self.modality = "image" if self.image is not None else "text"
        self.names: list[str] = []
        self._index: dict[Any, int] | None = None
        if self.label is None:
            if need_label:
                raise ValueError(
                    f"no label column in {sorted(feats)} (looked for `label`, `labels`); pass --label-column"
                )
            return
        feat = feats[self.label]
        if isinstance(feat, datasets.ClassLabel):
            self.names = [str(n) for n in feat.names]
            return
        values = self._values(ds, "the training data")
        for i, other in enumerate(others):
            if self.label not in other.features:
                raise ValueError(
                    f"the label column `{self.label}` is missing in evaluation split {i + 1}; "
                    f"its columns: {sorted(other.features)}"
                )
            values |= self._values(other, f"evaluation split {i + 1}")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise ValueError(f"integer labels in `{self.label}` must be ≥ 0; found {min(values)}")
            self.names = [str(i) for i in range(max(values) + 1)]
        else:
            ordered = sorted(values, key=str)
            self.names = [str(v) for v in ordered]
            self._index = {v: i for i, v in enumerate(ordered)}

    def _values(self, ds: Any, where: str) -> set[Any]:
        column = ds[self.label]
        empty = [i for i, v in enumerate(column) if _is_empty(v)]
        if empty:
            rows = ", ".join(str(i) for i in empty[:5]) + (f", … (+{len(empty) - 5} more)" if len(empty) > 5 else "")
            raise ValueError(
                f"the label column `{self.label}` has {len(empty)} empty cell(s) in {where} (rows {rows}); "
                "every example needs a label: fill them in or drop those rows"
            )
        return set(column)

    @property
    def num_labels(self) -> int:
        """How many classes."""
        return len(self.names)

    def label_id(self, value: Any) -> int:
        """The class id of a label value (see the module docstring for the rule)."""
        return int(value) if self._index is None else self._index[value]

    def check_classification(self, num_examples: int, *, what: str = "the training data") -> None:
        """Refuse data a classifier (or a prior learned from one) cannot use: fewer than 2 classes or examples.

        Example:
            >>> import datasets
            >>> Columns(datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 0]})).check_classification(2)
            Traceback (most recent call last):
            ...
            ValueError: the training data has 1 class (`label`: ['0']); classification needs at least 2 classes
        """
        if num_examples < 2:
            raise ValueError(
                f"{what} has {num_examples} example(s); training needs at least 2 (and SWAG snapshots of a "
                "single example only memorise it)"
            )
        if self.num_labels < 2:
            raise ValueError(
                f"{what} has {self.num_labels} class{'es' if self.num_labels != 1 else ''} "
                f"(`{self.label}`: {self.names}); classification needs at least 2 classes"
            )


def image_tensor(
    img: Any, size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Any:
    """A PIL image as a normalised ``[3, size, size]`` float tensor (RGB, resized, ``(x − mean) / std``).

    Example:
        >>> from PIL import Image
        >>> tuple(image_tensor(Image.new("L", (8, 8)), 16).shape)
        (3, 16, 16)
    """
    import numpy as np
    import torch

    arr = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@dataclass(frozen=True)
class ImageInput:
    """How images enter a backbone: resized to ``size`` × ``size``, then ``(x − mean) / std`` per channel.

    Example:
        >>> ImageInput(224).mean == IMAGENET_MEAN
        True
    """

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "ImageNet defaults"


def image_input(model: Any, *, name: str | None = None, size: int | None = None) -> ImageInput:
    """The input size and normalisation the backbone was pre-trained with, from its own configuration.

    timm models carry them in ``pretrained_cfg`` (``input_size``, ``mean``, ``std``); a transformers image model
    saved in a folder ``name`` in its ``preprocessor_config.json`` (``size``, ``image_mean``, ``image_std``);
    torchvision's pre-trained classifiers all use ImageNet's 224 px and mean/std, the default. ``size`` (the
    ``--image-size`` option) overrides the size only.

    Example:
        >>> import torch
        >>> image_input(torch.nn.Linear(2, 2), size=32)
        ImageInput(size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), source='ImageNet defaults')
    """
    import json

    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        side = int(cfg.get("input_size", (3, 224, 224))[-1])
        return ImageInput(
            size or side, tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])), "timm pretrained_cfg"
        )
    processor = Path(name) / "preprocessor_config.json" if name else None
    if processor is not None and processor.is_file():
        data = json.loads(processor.read_text(encoding="utf-8"))
        side = data.get("size", 224)
        if isinstance(side, dict):
            side = side.get("height") or side.get("shortest_edge") or 224
        mean = tuple(map(float, data.get("image_mean", IMAGENET_MEAN)))
        std = tuple(map(float, data.get("image_std", IMAGENET_STD)))
        return ImageInput(size or int(side), mean, std, "preprocessor_config.json")
    return ImageInput(size or 224)


def make_collate(
    cols: Columns,
    *,
    tokenizer: Any = None,
    image: ImageInput | None = None,
    max_length: int = 128,
    labels: bool = True,
) -> Any:
    """The ``collate_fn`` of every priorzoo trainer: rows → ``{"pixel_values": [B, 3, s, s]}`` (images, see
    :func:`image_input`) or the tokenizer's tensors (text, padded and truncated to ``max_length``), plus
    ``labels`` (class ids of :meth:`Columns.label_id`) when ``labels`` and the data has a label column.

    Raises:
        ValueError: text without a tokenizer, images without an :class:`ImageInput`.

    Example:
        >>> import datasets
        >>> from PIL import Image
        >>> ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": [1]})
        >>> ds = ds.cast_column("image", datasets.Image())
        >>> batch = make_collate(Columns(ds), image=ImageInput(16))([ds[0]])
        >>> tuple(batch["pixel_values"].shape), batch["labels"].tolist()
        ((1, 3, 16, 16), [1])
    """
    import torch

    with_labels = labels and cols.label is not None
    if cols.modality == "image":
        if image is None:
            raise ValueError("image data needs an ImageInput (size and normalisation): see image_input")

        def collate_images(rows: list[dict[str, Any]]) -> dict[str, Any]:
            out = {
                "pixel_values": torch.stack(
                    [image_tensor(r[cols.image], image.size, image.mean, image.std) for r in rows]
                )
            }
            if with_labels:
                out["labels"] = torch.tensor([cols.label_id(r[cols.label]) for r in rows], dtype=torch.long)
            return out

        return collate_images
    if tokenizer is None:
        raise ValueError("text data needs the backbone's tokenizer, and none could be loaded")

    def collate_text(rows: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [str(r[cols.text]) for r in rows]
        pairs = [str(r[cols.text_pair]) for r in rows] if cols.text_pair else None
        enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = dict(enc)
        if with_labels:
            out["labels"] = torch.tensor([cols.label_id(r[cols.label]) for r in rows], dtype=torch.long)
        return out

    return collate_text
