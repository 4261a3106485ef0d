"""Read training data for learning and fine-tuning: one loader, one label-ordering rule, clear errors.

:func:`load_data` reads a ``datasets.Dataset`` from a local folder (``save_to_disk`` output, or an image
folder ``<class>/<image>``), a CSV/TSV, JSON(L) or parquet file, or — online — a Hub dataset id. CSV files are
checked row by row first: a row with another number of fields than the header is an error naming its line
(``datasets`` would otherwise shift the columns silently or fail deep inside pyarrow).

The label rule, used by ``priorzoo learn``, ``priorzoo finetune``, the demo, the bundled corpora
(:mod:`priorzoo.data.bundled`) and the zoo recipes alike, lives in one function, :func:`class_names`: **label values
are names**, mapped to contiguous class ids ``0 … C−1``.

- every value is named by a string (:func:`label_name`): an integer (or an integral float) by its decimal
  digits, a string by itself without surrounding spaces;
- the distinct names are ordered: those that read as numbers first, by value (so ``1, 2, 10``), then the
  rest as text; class id i is name i. Integer labels ``1, 2, 10`` are 3 classes and ``0, 10⁸`` are 2,
  never a 10⁸-class head; the label→id mapping is recorded with the names (``id2label``).

:class:`Columns` finds the input column (image or text, plus an optional text pair) and the label column.
A ``datasets.ClassLabel`` column (an image folder's sub-folder names, a Hub dataset) keeps its own names in
its own order; evaluation splits are mapped onto the training split's names with :meth:`Columns.align`.
Empty label cells (``None``, NaN, a string of whitespace only, a ``ClassLabel`` −1) are an error naming the
column and the first rows, never a class of their own. :meth:`Columns.check_classification` refuses one
class or one example.

**One input pipeline.** :func:`image_input` reads the input size and normalisation from the backbone's own
configuration (timm's ``pretrained_cfg``, a transformers folder's ``preprocessor_config.json``; ImageNet's for
torchvision), and :func:`make_collate` turns rows into the batches every trainer of priorzoo takes: a dict
with ``pixel_values`` (images) or the tokenizer's tensors (text, :func:`tokenize`), plus ``labels``.
``priorzoo learn`` and ``priorzoo finetune`` build their batches here and the demo tokenizes here, so a prior is
learned and used on the same inputs.

Example:
    >>> import datasets
    >>> ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]})
    >>> cols = Columns(ds)
    >>> cols.text, cols.label, cols.names, [cols.label_id(v) for v in ds["label"]]
    ('text', 'label', ['neg', 'pos'], [1, 0, 1])
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import re
from collections.abc import Iterable, Sequence
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
    "class_names",
    "image_input",
    "image_tensor",
    "label_name",
    "load_data",
    "make_collate",
    "tokenize",
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
    from priorzoo.extras import require

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
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return math.isnan(float(value))
    return value is None or (isinstance(value, str) and not value.strip())


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def label_name(value: Any) -> str:
    """The class name of one label value: integers (and integral floats) by their digits, strings stripped.

    Raises:
        ValueError: an empty label (``None``, NaN, blank).

    Example:
        >>> [label_name(v) for v in (10, 3.0, 0.5, " pos ", True)]
        ['10', '3', '0.5', 'pos', 'True']
    """
    if _is_empty(value):
        raise ValueError(f"an empty label ({value!r}) has no class name")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return str(int(number)) if number.is_integer() else repr(number)
    return str(value).strip()


def _name_order(name: str) -> tuple[int, float, str]:
    if _NUMBER.fullmatch(name):
        number = float(name)
        if math.isfinite(number):
            return (0, number, name)
    return (1, 0.0, name)


def class_names(values: Iterable[Any]) -> list[str]:
    """The one label rule: the class names (strings) of some label values, in class-id order.

    Label values are names (see :func:`label_name`); the distinct names are sorted, those that read as
    numbers first by value, then the others as text. Class id i is ``class_names(...)[i]``: C distinct
    labels give C contiguous ids ``0 … C−1`` whatever their values (memory follows C, not the largest
    integer).

    Raises:
        ValueError: an empty label (``None``, NaN, blank).

    Example:
        >>> class_names([10, 1, 2, 1])
        ['1', '2', '10']
        >>> class_names([0, 10**8])
        ['0', '100000000']
        >>> class_names(["pos", "neg", "10", "9"])
        ['9', '10', 'neg', 'pos']
    """
    return sorted({label_name(v) for v in values}, key=_name_order)


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
            label cells, a split without the label column.
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
        self._index: dict[str, int] = {}
        self._classlabel = False
        if self.label is None:
            if need_label:
                raise ValueError(
                    f"no label column in {sorted(feats)} (looked for `label`, `labels`); pass --label-column"
                )
            return
        for i, other in enumerate(others):
            if self.label not in other.features:
                raise ValueError(
                    f"the label column `{self.label}` is missing in evaluation split {i + 1}; "
                    f"its columns: {sorted(other.features)}"
                )
        splits = [(ds, "the training data"), *((o, f"evaluation split {i + 1}") for i, o in enumerate(others))]
        names = [self._names(d, where) for d, where in splits]
        if isinstance(feats[self.label], datasets.ClassLabel):
            # an image folder's sub-folders / a Hub ClassLabel: its names in its own order (the ids it stores);
            # names only an evaluation split has join after them
            self._classlabel = True
            self.names = list(names[0])
            extra = set().union(*names[1:]) - set(self.names) if len(names) > 1 else set()
            self.names += sorted(extra, key=_name_order)
        else:
            self.names = class_names(set().union(*names))
        self._index = {n: i for i, n in enumerate(self.names)}

    def _names(self, ds: Any, where: str) -> list[str]:
        """The class names a split's label column holds (a ClassLabel: all of its names, in its order)."""
        import datasets

        column = ds[self.label]
        feat = ds.features[self.label]
        if isinstance(feat, datasets.ClassLabel):
            n = len(feat.names)
            empty = [i for i, v in enumerate(column) if v is None or not 0 <= v < n]
        else:
            empty = [i for i, v in enumerate(column) if _is_empty(v)]
        if empty:
            rows = ", ".join(str(i) for i in empty[:5]) + (f", … (+{len(empty) - 5} more)" if len(empty) > 5 else "")
            raise ValueError(
                f"the label column `{self.label}` has {len(empty)} empty cell(s) in {where} (rows {rows}); "
                "every example needs a label: fill them in or drop those rows"
            )
        if isinstance(feat, datasets.ClassLabel):
            return [str(name) for name in feat.names]
        return class_names(set(column))

    @property
    def num_labels(self) -> int:
        """How many classes."""
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        """The class names by class id (what a transformers ``config.id2label`` and a prior's source record).

        Example:
            >>> import datasets
            >>> Columns(datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [10, 1, 2]})).id2label
            {0: '1', 1: '2', 2: '10'}
        """
        return dict(enumerate(self.names))

    def label_id(self, value: Any) -> int:
        """The class id of a label value of the training split (or of a split passed through :meth:`align`).

        Raises:
            ValueError: a label that is not one of :attr:`names` (the message lists some valid ones).
        """
        if self._classlabel:
            return int(value)
        name = label_name(value)
        if name not in self._index:
            shown = ", ".join(repr(n) for n in self.names[:10]) + (", …" if len(self.names) > 10 else "")
            raise ValueError(f"label {value!r} of `{self.label}` is not one of the {self.num_labels} classes ({shown})")
        return self._index[name]

    def align(self, ds: Any) -> Any:
        """An evaluation split whose label column reads like the training split's, so that :meth:`label_id`
        gives every split the same class ids. Only a split with a ``ClassLabel`` of other names than the
        training split's (an image folder with other sub-folders), or a ``ClassLabel`` where the training
        labels are plain values (or the reverse), is rewritten, by name; any other split is returned as is.

        Example:
            >>> import datasets
            >>> train = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["cat", "dog"]})
            >>> val = datasets.Dataset.from_dict({"text": ["c"], "label": [0]}).cast_column(
            ...     "label", datasets.ClassLabel(names=["dog"]))
            >>> cols = Columns(train, others=[val])
            >>> [cols.label_id(v) for v in cols.align(val)["label"]]
            [1]
        """
        import datasets

        if self.label is None:
            return ds
        feat = ds.features[self.label]
        own = isinstance(feat, datasets.ClassLabel)
        if own and self._classlabel and [str(n) for n in feat.names] == self.names[: len(feat.names)]:
            return ds  # the same ids (a prefix of the joint names)
        if not own and not self._classlabel:
            return ds
        features = ds.features.copy()
        if self._classlabel:
            features[self.label] = datasets.ClassLabel(names=self.names)
        else:
            features[self.label] = datasets.Value("string")

        def relabel(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            names = [feat.int2str(v) if own else label_name(v) for v in batch[self.label]]
            return {self.label: [self._index[n] for n in names] if self._classlabel else names}

        return ds.map(relabel, batched=True, features=features, keep_in_memory=True)

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


def tokenize(
    tokenizer: Any,
    texts: Sequence[str],
    pairs: Sequence[str] | None = None,
    *,
    max_length: int,
    padding: bool | str = True,
) -> Any:
    """The tokenizer call of every priorzoo text pipeline (:func:`make_collate`, the demo's encoder): texts (and
    optional pairs) truncated to ``max_length`` tokens, padded (``True``: to the longest in the batch;
    ``"max_length"``: to ``max_length``), as PyTorch tensors.

    Example:
        >>> from transformers import BertTokenizerFast  # doctest: +SKIP
        >>> tokenize(tokenizer, ["a b c"], max_length=2)["input_ids"].shape  # doctest: +SKIP
        torch.Size([1, 2])
    """
    return tokenizer(
        list(texts),
        list(pairs) if pairs is not None else None,
        padding=padding,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


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
        >>> tuple(batch["pixel_values"].shape), batch["labels"].tolist()  # label 1 is the only class: id 0
        ((1, 3, 16, 16), [0])
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
        out = dict(tokenize(tokenizer, texts, pairs, max_length=max_length))
        if with_labels:
            out["labels"] = torch.tensor([cols.label_id(r[cols.label]) for r in rows], dtype=torch.long)
        return out

    return collate_text
