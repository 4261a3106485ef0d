"""Transfer with LoRA (issue 15): LoRA vs LoRA + L2-SP on ΔW vs LoRA + learned prior (+ BMA), on the text pair
of ``bench_transfer.py``.

Same source prior, data, splits, sizes, seeds and budget as the text pair of ``benchmarks/bench_transfer.py``
(all-MiniLM-L6-v2; SWAG prior over encoder layer 5 learned on non-airline tweets; target: airline tweet
sentiment, 10 / 30 / 100 tweets per class; lower layers frozen and cached), except that every target model is
wrapped in LoRA adapters after its initialisation at the prior mean: r = 8, α = 16 on layer 5's ``query`` and
``value``, the new ``classifier`` trained in full (``modules_to_save``). The four methods of
:func:`priorzoo.demo.compare_methods` then become:

- ``LoRA``: no prior, learning rate chosen on the validation split;
- ``LoRA + L2-SP on ΔW``: the isotropic prior N(W₀, σ²I) centred on the starting weights (the prior mean),
  i.e. ‖ΔW‖²/(2σ²) on the adapted layers, σ² chosen on validation;
- ``LoRA + learned prior``: the SWAG prior at the effective weights W₀ + ΔW, the rest of layer 5 held at its
  values (the conditional prior, :mod:`priorzoo.binding.conditional`), λ chosen on validation;
- ``LoRA + learned prior + BMA``: SWAG over the adapters and the head of the selected run, averaged
  predictive (the downstream posterior over a LoRA run).

Run:   HF_HUB_OFFLINE=1 python benchmarks/bench_peft_transfer.py [--seeds 0 1 2] [--per-class 10 30 100]
       python benchmarks/bench_peft_transfer.py --report      (rebuild peft_transfer.md from the JSON)
Writes benchmarks/results/peft_transfer.json and peft_transfer.md (after every (size, seed) run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench_transfer as bt

RESULTS = Path(__file__).parent / "results"
LABELS = {
    "fine-tuning": "LoRA",
    "L2-SP": "LoRA + L2-SP on ΔW",
    "learned prior": "LoRA + learned prior",
    "learned prior + BMA": "LoRA + learned prior + BMA",
}
LORA = {"r": 8, "alpha": 16, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}


def wrap_in_lora(model: Any) -> Any:
    from priorzoo.binding.peft import lora_model

    return lora_model(
        model,
        r=LORA["r"],
        alpha=LORA["alpha"],
        target_modules=LORA["target_modules"],
        modules_to_save=LORA["modules_to_save"],
    )


def write_report(data: dict[str, Any], command: str) -> None:
    data = dict(data, command=command, lora=LORA)
    (RESULTS / "peft_transfer.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    runs = [r for r in data["runs"] if r["pair"] == "text"]
    agg = bt._aggregate(runs)
    info = data["pairs"].get("text", {})
    lines = [
        "# Transfer with LoRA: LoRA vs LoRA + L2-SP on ΔW vs LoRA + learned prior (+ BMA)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {data['environment']['platform']}, {data['environment']['cpu_count']} CPU cores (shared), "
        f"torch {data['environment']['torch']}; wall time {data['wall_seconds'] / 60:.1f} min.  ",
        f"Status: **{'complete' if data['complete'] else 'PARTIAL — only the rows below ran'}** "
        f"({len(runs)} of {data['planned_runs']} (size, seed) runs).",
        "",
        f"Pair: {info.get('source', '?')} → {info.get('target', '?')}. Backbone: {info.get('backbone', '?')}. "
        f"Prior: SWAG, K = {info.get('prior_rank', '?')}, over {info.get('prior_parameters', 0):,} weights. "
        f"LoRA r = {LORA['r']}, α = {LORA['alpha']} on layer 5's {'/'.join(LORA['target_modules'])}, classifier "
        "trained in full; every model starts at the prior mean (adapters at their init, B = 0). Same budget, "
        "grids, selection (validation NLL) and test splits as the text pair of `transfer.md` (which fine-tunes "
        "all of layer 5 instead).",
        "",
        "| n | seeds | method | accuracy | NLL | ECE | selected (per seed) |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    sizes = sorted(n for (_, n) in agg)
    for n in sizes:
        best = max(agg[("text", n)][m]["accuracy"][0] for m in agg[("text", n)])
        for meth, label in LABELS.items():
            if meth not in agg[("text", n)]:
                continue
            a, nl, e = (agg[("text", n)][meth][k] for k in ("accuracy", "nll", "ece"))
            mark = "**" if a[0] == best else ""
            picks = [
                m["value"]
                for r in sorted(runs, key=lambda r: r["seed"])
                if r["num_train"] == n
                for m in r["methods"]
                if m["method"] == meth
            ]
            knob = {"fine-tuning": "lr", "L2-SP": "σ²"}.get(meth, "λ")
            lines.append(
                f"| {n} | {a[2]} | {label} | {mark}{a[0]:.4f} ± {a[1]:.4f}{mark} | {nl[0]:.4f} ± {nl[1]:.4f} | "
                f"{e[0]:.4f} ± {e[1]:.4f} | {knob} = {', '.join(f'{v:.3g}' for v in picks)} |"
            )
    lines += [
        "",
        "Accuracy difference to LoRA alone, paired by seed (mean ± std, percentage points; positive = better):",
        "",
        "| n | " + " | ".join(LABELS[m] for m in list(LABELS)[1:]) + " |",
        "|---:|" + "---:|" * (len(LABELS) - 1),
    ]
    for n in sizes:
        by_seed = [{m["method"]: m["accuracy"] for m in r["methods"]} for r in runs if r["num_train"] == n]
        cells = []
        for meth in list(LABELS)[1:]:
            diffs = [100 * (acc[meth] - acc["fine-tuning"]) for acc in by_seed if meth in acc]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.fmean(diffs):+.1f} ± {sd:.1f}" if diffs else "")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Validation curves and selected values per run: `peft_transfer.json`.", ""]
    (RESULTS / "peft_transfer.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--per-class", nargs="+", type=int, default=None, help="sizes (default 10 30 100)")
    parser.add_argument("--report", action="store_true", help="only rebuild peft_transfer.md from the JSON")
    parser.add_argument("--smoke", metavar="DIR", default=None, help="tiny sizes, results into DIR (a code check)")
    args = parser.parse_args(argv)
    global RESULTS
    command = "HF_HUB_OFFLINE=1 python benchmarks/bench_peft_transfer.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    if args.smoke:
        RESULTS = Path(args.smoke)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.report:
        data = json.loads((RESULTS / "peft_transfer.json").read_text())
        write_report(data, data["command"])
        return 0
    if args.per_class is not None:
        keep = [bt.TEXT["per_class"].index(pc) for pc in args.per_class]
        for key in ("per_class", "target_steps"):
            bt.TEXT[key] = tuple(bt.TEXT[key][i] for i in keep)
    bt.TEXT_MODEL_HOOK = wrap_in_lora
    bt.METHODS_RUN = bt.METHOD_ORDER[:1] + bt.METHOD_ORDER[2:]  # the four methods of this comparison,
    bt.BASELINES_FROM_SOURCE = False  # every one from μ
    bt.write_report = lambda data: write_report(data, command.strip())  # after every (size, seed) run
    with tempfile.TemporaryDirectory(prefix="priorzoo-peft-transfer-") as tmp:
        bt.RESULTS = Path(tmp)  # bench_transfer's own files go to a scratch folder
        inner = ["--pairs", "text", "--seeds", *map(str, args.seeds)] + (["--smoke", tmp] if args.smoke else [])
        return bt.main(inner)


if __name__ == "__main__":
    raise SystemExit(main())
