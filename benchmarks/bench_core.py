"""Core benchmark (issue 2): penalty cost vs the memory-bandwidth floor, binding memory, load time.

A ResNet-50-sized prior (the 161 parameter shapes of timm ``resnet50`` without ``fc``: 23.5M weights) with
K = 20 float32 factor rows. Everything is measured in the same process, interleaved, median of repeats:

- floor: one contiguous K×P matrix streamed through two mat-vecs (``F @ x`` then ``Fᵀ @ u``);
- penalty: ``BoundPrior.penalty()`` value + ``backward()`` (gradients into the model's parameters);
- bind memory: RSS growth when binding (the budget is at most one extra K×P copy);
- load: ``PriorModel.from_pretrained`` vs ``safetensors.torch.load_file`` + one read of every tensor, and the
  peak RSS of a fresh process doing only the load.

Run:  python benchmarks/bench_core.py  [--repeats 5] [--rank 20]
Writes benchmarks/results/core.json and benchmarks/results/core.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from priorzoo import PriorModel

RESULTS = Path(__file__).parent / "results"


def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    import timm

    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False)
    return {n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("fc.")}


def make_prior(shapes, rank: int) -> PriorModel:
    g = torch.Generator().manual_seed(0)
    mean = {n: torch.randn(s, generator=g) * 0.05 for n, s in shapes.items()}
    var = {n: torch.rand(s, generator=g) * 1e-3 + 1e-4 for n, s in shapes.items()}
    fac = {n: torch.randn((rank, *s), generator=g) * 1e-3 for n, s in shapes.items()}
    return PriorModel.from_tensors(mean, var, fac, backbone={"library": "timm", "name": "resnet50"})


class FlatModel(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.params = torch.nn.ParameterDict(
            {n.replace(".", "__"): torch.nn.Parameter(torch.randn(s) * 0.05) for n, s in shapes.items()}
        )

    def named_parameters(self, *args, **kwargs):  # expose the original dotted names
        for n, p in self.params.items():
            yield n.replace("__", "."), p


def timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def load_peak(folder: str) -> None:
    """Child process: load the prior and print peak RSS (bytes)."""
    t0 = time.perf_counter()
    PriorModel.from_pretrained(folder)
    dt = time.perf_counter() - t0
    # VmHWM is this process image's peak RSS (ru_maxrss would carry the parent's peak across exec)
    with open("/proc/self/status") as fh:
        hwm_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_bytes": hwm_kb * 1024, "seconds": dt}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--load-peak", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_peak:
        load_peak(args.load_peak)
        return
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    prior = make_prior(shapes, args.rank)
    P, K = prior.num_parameters, prior.rank
    print(f"prior: {len(shapes)} tensors, P = {P:,}, K = {K}")

    # ---- penalty vs floor
    flat_f = torch.randn(K, P) * 1e-3
    x = torch.randn(P)
    u = torch.randn(K)

    def floor():
        t = flat_f @ x
        y = flat_f.T @ (u + t * 0)  # depends on t so nothing is skipped
        return y

    model = FlatModel(shapes)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    bound = prior.bind(model)
    bind_extra = proc.memory_info().rss - rss0
    # what the binding holds beyond the prior's own tensors (new storages only)
    g = bound.gaussian
    held = sum(t.numel() * t.element_size() for t in g.inv_a)
    for n, m in zip(g.names, g.mean):
        held += 0 if m.data_ptr() == prior.mean[n].data_ptr() else m.numel() * m.element_size()
    for n, f in zip(g.names, g.factor or []):
        held += 0 if f.data_ptr() == prior.cov_factor[n].data_ptr() else f.numel() * f.element_size()

    def step():
        for p in model.parameters():
            p.grad = None
        bound.penalty().backward()

    floor()
    step()  # warm up
    floor_t, pen_t = [], []
    for _ in range(args.repeats):
        floor_t += timeit(floor, 1)
        pen_t += timeit(step, 1)
    flat_f.resize_(0)  # free the floor's K×P matrix before the load measurements

    # ---- load
    with tempfile.TemporaryDirectory() as tmp:
        folder = prior.save_pretrained(Path(tmp) / "prior", max_shard_size="10GB")
        weights = folder / "prior.safetensors"
        from safetensors.torch import load_file

        def baseline_load():
            tensors = load_file(str(weights))
            return sum(float(t.sum()) for t in tensors.values())

        def our_load():
            return PriorModel.from_pretrained(folder)

        baseline_load()
        our_load()
        base_t, load_t = [], []
        for _ in range(args.repeats):
            base_t += timeit(baseline_load, 1)
            load_t += timeit(our_load, 1)
        child = subprocess.run(
            [sys.executable, __file__, "--load-peak", str(folder)], capture_output=True, text=True, check=True
        )
        peak = json.loads(child.stdout.strip().splitlines()[-1])
        file_bytes = weights.stat().st_size

    med = statistics.median
    result = {
        "command": "python benchmarks/bench_core.py" + (f" --repeats {args.repeats}" if args.repeats != 5 else ""),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "P": P,
        "K": K,
        "factor_bytes": K * P * 4,
        "penalty_value_and_grad_s": med(pen_t),
        "two_matvec_floor_s": med(floor_t),
        "penalty_over_floor": med(pen_t) / med(floor_t),
        "bind_extra_rss_bytes": bind_extra,
        "bind_extra_over_factor": bind_extra / (K * P * 4),
        "bind_held_bytes": held,
        "from_pretrained_s": med(load_t),
        "load_file_plus_read_s": med(base_t),
        "load_over_baseline": med(load_t) / med(base_t),
        "load_peak_rss_bytes": peak["peak_rss_bytes"],
        "file_bytes": file_bytes,
        "targets": {"penalty_over_floor": 1.5, "bind_extra_over_factor": 1.0, "load_over_baseline": 1.5},
        "raw": {"penalty_s": pen_t, "floor_s": floor_t, "load_s": load_t, "baseline_load_s": base_t},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "core.json").write_text(json.dumps(result, indent=2) + "\n")
    ok = {k: result[k] <= v for k, v in result["targets"].items()}
    md = [
        "# Core benchmark (issue 2)",
        "",
        f"Command: `{result['command']}` — {result['machine']}, torch {result['torch']}.",
        f"Prior: ResNet-50 backbone shapes without `fc`, P = {P:,}, K = {K}, float32 "
        f"(factor {K * P * 4 / 1e9:.2f} GB). Median of {args.repeats} interleaved repeats.",
        "",
        "| measure | priorzoo | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| penalty value + gradient | {med(pen_t):.3f} s | two mat-vecs over a K×P matrix {med(floor_t):.3f} s "
        f"| {result['penalty_over_floor']:.2f}× | ≤ 1.5× | {'yes' if ok['penalty_over_floor'] else 'no'} |",
        f"| extra memory at bind (RSS growth; tensors it holds: {held / 1e6:.0f} MB, i.e. A⁻¹) "
        f"| {bind_extra / 1e6:.0f} MB | one K×P copy {K * P * 4 / 1e6:.0f} MB "
        f"| {result['bind_extra_over_factor']:.2f} | ≤ 1 copy | {'yes' if ok['bind_extra_over_factor'] else 'no'} |",
        f"| `from_pretrained` | {med(load_t):.3f} s | `load_file` + one read {med(base_t):.3f} s "
        f"| {result['load_over_baseline']:.2f}× | ≤ 1.5× | {'yes' if ok['load_over_baseline'] else 'no'} |",
        f"| peak RSS of a process that only loads | {peak['peak_rss_bytes'] / 1e9:.2f} GB | file size "
        f"{file_bytes / 1e9:.2f} GB | {peak['peak_rss_bytes'] / file_bytes:.2f} | — | — |",
        "",
    ]
    (RESULTS / "core.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
