"""Which no-validation learning-rate rule for the learned-scale arms: final data loss or final DE-ELBO objective?

The learned-scale arms of ``bench_learned_scale.py`` train one run per learning rate of a short list on all n and
keep one run without validation data. Two rules are compared here on the same runs, per (arm, n, seed):

- ``data``: the lowest final *data* loss, the mean NLL at the sampled weights w̄ + σε over the last epoch;
- ``objective``: the lowest final *training objective*, data loss + KL(q‖p)/D over the last epoch (the
  data-emphasized ELBO that the run minimises).

What the history holds (checked in ``priorzoo.finetune.loop``): for a ``scale="learned"`` run ``train_step`` returns
``loss = data_loss + prior_term`` with ``prior_term`` = KL/D at the closed-form λ_g (constants included: at λ⋆
the trace/quadratic term equals D_g, so KL_g = ½(D_g log λ_g + log det S_g − D_g log σ²)); ``fit`` averages
``loss`` into ``history[-1]["train_loss"]`` and ``prior_term`` into ``history[-1]["prior_term"]`` over the same
steps. So the objective is ``train_loss`` and the data loss is ``train_loss − prior_term``. The value
``bench_learned_scale.train_once`` returns (and its ``noval_arm`` minimises) is ``train_loss``: the objective.

An ``oracle`` pick (the lr with the best *test* accuracy) is recorded too, as the ceiling of any lr rule on this
list; it is not a usable rule.

Pair: the text pair of ``bench_learned_scale.py`` (MiniLM top layer + head, airline tweets), n = 15 (5 seeds) and
n = 60 (3 seeds), arms L2-SP (learned) and LP (learned), lrs (0.01, 0.03, 0.1); runs are those of
``bench_learned_scale.train_once`` (imported, same seeds, epochs and batch size), with the fit result captured.

Run (one process, one thread):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_lr_rule.py
    python benchmarks/bench_lr_rule.py --report

Writes benchmarks/results/lr_rule.json (after every (n, seed)) and lr_rule.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from bench_learned_scale import TEXT, _evaluate, epochs_for, starts, text_pair, train_once

RESULTS = Path(__file__).parent / "results"
SIZES = {0: 5, 1: 3}  # size index of TEXT["per_class"] -> seeds (n = 15: 5 seeds, n = 60: 3 seeds)
ARMS = ("L2-SP (learned)", "LP (learned)")
RULES = ("data", "objective", "oracle")


@contextlib.contextmanager
def capture_fits() -> Iterator[list]:
    """Record the :class:`~priorzoo.finetune.FitResult` of every ``fit_fresh`` call ``train_once`` makes."""
    import priorzoo.finetune.runners as runners

    original, results = runners.fit_fresh, []

    def recording(*args: Any, **kwargs: Any):
        model, res = original(*args, **kwargs)
        results.append(res)
        return model, res

    runners.fit_fresh = recording
    try:
        yield results
    finally:
        runners.fit_fresh = original


def one_run(make_model, train, test, *, lr: float, epochs: int, seed: int, prior) -> dict[str, Any]:
    t = time.perf_counter()
    with capture_fits() as fits:
        model, returned, learned = train_once(
            make_model, train, lr=lr, epochs=epochs, batch=TEXT["batch_size"], seed=seed, prior=prior, scale="learned"
        )
    metrics = _evaluate(model, test)
    if model is None or not fits:
        return {"lr": lr, "diverged": True, "objective": math.inf, "data_loss": math.inf, "metrics": metrics}
    last = fits[-1].history[-1]
    objective, prior_term = last["train_loss"], last["prior_term"]
    return {
        "lr": lr,
        "diverged": not math.isfinite(objective),
        "objective": objective,
        "prior_term": prior_term,
        "data_loss": objective - prior_term,
        "train_once_value": returned,  # what bench_learned_scale's noval_arm minimises
        "scales": learned["scales"],
        "sigma": learned["sigma"],
        "kappa": learned["kappa"],
        "metrics": metrics,
        "seconds": time.perf_counter() - t,
    }


def _key(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def picks(runs: list[dict]) -> dict[str, dict]:
    """rule -> the run it keeps."""
    return {
        "data": min(runs, key=lambda r: _key(r["data_loss"])),
        "objective": min(runs, key=lambda r: _key(r["objective"])),
        "oracle": max(runs, key=lambda r: -1.0 if math.isnan(r["metrics"]["accuracy"]) else r["metrics"]["accuracy"]),
    }


def run_config(fresh, prior, checkpoint, train, test, seed: int, size_index: int) -> dict[str, Any]:
    from priorzoo.learn import isotropic_prior

    n = len(train)
    epochs = epochs_for(TEXT, n, size_index)
    at_checkpoint, at_mean = starts(fresh, prior, checkpoint)
    l2sp_unit = isotropic_prior(at_checkpoint(), 1.0, exclude=["classifier.*"])
    setups = {"L2-SP (learned)": (at_checkpoint, l2sp_unit), "LP (learned)": (at_mean, prior)}
    out: dict[str, Any] = {"n": n, "seed": seed, "epochs": epochs, "arms": {}}
    for arm, (make_model, p) in setups.items():
        runs = [one_run(make_model, train, test, lr=lr, epochs=epochs, seed=seed, prior=p) for lr in TEXT["lrs"]]
        chosen = picks(runs)
        out["arms"][arm] = {"runs": runs, "picks": {rule: r["lr"] for rule, r in chosen.items()}}
        for r in runs:
            print(
                f"  {arm:<16} lr {r['lr']:<5} data {r['data_loss']:.4f} KL/D {r.get('prior_term', math.nan):.4f} "
                f"obj {r['objective']:.4f} σ {r.get('sigma', math.nan):.3g} acc {r['metrics']['accuracy']:.3f}",
                flush=True,
            )
        print(f"  {arm:<16} picks {out['arms'][arm]['picks']}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ report
def _pick_acc(arm: dict, rule: str) -> float:
    lr = arm["picks"][rule]
    return next(r for r in arm["runs"] if r["lr"] == lr)["metrics"]["accuracy"]


def _mean_sd(vals: list[float]) -> str:
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return "–"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):+.1f} ± {sd:.1f}"


def _cells(runs: list[dict]) -> Iterator[tuple[str, int, list[dict]]]:
    """(arm, n, that n's runs sorted by seed) for every row of the summary tables."""
    for arm in ARMS:
        for n in sorted({r["n"] for r in runs}):
            yield arm, n, sorted((r for r in runs if r["n"] == n), key=lambda r: r["seed"])


def write_report() -> None:
    d = json.loads((RESULTS / "lr_rule.json").read_text())
    grid_path = RESULTS / "learned_scale_text.json"
    grid = {}
    if grid_path.exists():
        for r in json.loads(grid_path.read_text())["runs"]:
            grid[(r["n"], r["seed"])] = r["arms"]
    runs = d["runs"]
    lines = [
        "# lr rule for the learned-scale arms: final data loss vs final DE-ELBO objective (text pair)",
        "",
        f"Script: `benchmarks/bench_lr_rule.py`. Command: `{d['command']}`. Machine: {d['machine']['platform']}, "
        f"{d['machine']['cpus']} CPUs{d['machine'].get('load', '')}, torch {d['machine']['torch']}, "
        f"{d['machine']['threads']} thread. Wall time: {d.get('wall_seconds', math.nan) / 60:.1f} min "
        f"(source stage {d['source_seconds']:.0f} s). Complete: {d['complete']} ({len(runs)} of {d['planned']} "
        "(n, seed) configurations).",
        "",
        "Pair: all-MiniLM-L6-v2 top layer + head, airline tweet sentiment (3 classes), runs of "
        "`bench_learned_scale.train_once` (same seeds, epochs, batch, lrs 0.01 / 0.03 / 0.1). Rules: **data** = lowest "
        "final data loss (mean NLL at the sampled weights over the last epoch = `train_loss − prior_term`); "
        "**objective** = lowest final data loss + KL/D (= `train_loss`, which is what `bench_learned_scale`'s "
        "no-validation arms already minimise); **oracle** = best *test* accuracy among the lrs (a ceiling, "
        "not a rule).",
        "",
        "## Paired differences in test accuracy (percentage points, mean ± SD over seeds)",
        "",
        "| arm | n | seeds | data − objective | oracle − objective | objective − grid twin | data − grid twin "
        "| oracle − grid twin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    twin = {"L2-SP (learned)": "L2-SP (grid)", "LP (learned)": "LP (grid)"}
    for arm, n, rows in _cells(runs):

        def diff(a: str, b: str, rows=rows, arm=arm, n=n) -> str:
            vals = []
            for r in rows:
                x = _pick_acc(r["arms"][arm], a)
                if b in RULES:
                    y = _pick_acc(r["arms"][arm], b)
                elif (n, r["seed"]) in grid:
                    y = grid[(n, r["seed"])][b]["metrics"]["accuracy"]
                else:
                    continue
                vals.append(100 * (x - y))
            return _mean_sd(vals)

        lines.append(
            f"| {arm} | {n} | {len(rows)} | {diff('data', 'objective')} | {diff('oracle', 'objective')} | "
            f"{diff('objective', twin[arm])} | {diff('data', twin[arm])} | {diff('oracle', twin[arm])} |"
        )
    lines += [
        "",
        "## Mean test accuracy of each rule's pick",
        "",
        "| arm | n | data | objective | oracle | grid twin (learned_scale_text.json) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, n, rows in _cells(runs):
        cells = [f"{statistics.fmean(_pick_acc(r['arms'][arm], rule) for r in rows):.3f}" for rule in RULES]
        tw = [grid[(n, r["seed"])][twin[arm]]["metrics"]["accuracy"] for r in rows if (n, r["seed"]) in grid]
        cells.append(f"{statistics.fmean(tw):.3f}" if tw else "–")
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Which lr each rule picked (per seed, seeds in order)",
        "",
        "| arm | n | data | objective | oracle |",
        "|---|---|---|---|---|",
    ]
    for arm, n, rows in _cells(runs):
        cells = [", ".join(str(r["arms"][arm]["picks"][rule]) for r in rows) for rule in RULES]
        lines.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "| arm | n | seed | lr | data loss | KL/D | objective | λ per group | σ | test acc | test NLL | picked by |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        for r in runs:
            a = r["arms"][arm]
            for run in a["runs"]:
                by = ", ".join(rule for rule in RULES if a["picks"][rule] == run["lr"])
                lam = ", ".join(f"{g} {v:.3g}" for g, v in run.get("scales", {}).items()) or "–"
                lines.append(
                    f"| {arm} | {r['n']} | {r['seed']} | {run['lr']} | {run['data_loss']:.4f} | "
                    f"{run.get('prior_term', math.nan):.4f} | {run['objective']:.4f} | {lam} | "
                    f"{run.get('sigma', math.nan):.3g} | {run['metrics']['accuracy']:.3f} | "
                    f"{run['metrics']['nll']:.3f} | {by or '–'} |"
                )
    reading = d.get("reading")
    if reading:
        lines += ["", "## Reading", "", reading]
    (RESULTS / "lr_rule.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="rebuild lr_rule.md from lr_rule.json")
    parser.add_argument("--resume", action="store_true", help="keep the configurations the results file has")
    args = parser.parse_args(argv)
    if args.report:
        write_report()
        return 0
    start = time.perf_counter()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    info, make, spec = text_pair()
    print(f"[text] source + prior in {info['source_seconds']:.0f} s", flush=True)
    plan = [(seed, si) for si, k in SIZES.items() for seed in range(k)]
    path = RESULTS / "lr_rule.json"
    out: dict[str, Any] = {
        "command": " ".join(
            [
                "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_lr_rule.py",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "source_seconds": info["source_seconds"],
        "lrs": list(spec["lrs"]),
        "planned": len(plan),
        "complete": False,
        "runs": [],
    }
    if args.resume and path.exists():
        old = json.loads(path.read_text())
        out["runs"], start = old["runs"], start - old.get("wall_seconds", 0.0)
    done = {(r["seed"], r["n"]) for r in out["runs"]}
    for seed, si in plan:
        if (seed, spec["per_class"][si] * 3) in done:
            continue
        fresh, prior, checkpoint, train, test = make(seed, si)
        print(f"[text] n = {len(train)}, seed {seed}", flush=True)
        out["runs"].append(run_config(fresh, prior, checkpoint, train, test, seed, si))
        out["complete"] = len(out["runs"]) == len(plan)
        out["wall_seconds"] = time.perf_counter() - start
        path.write_text(json.dumps(out, indent=1, default=float))
    write_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
