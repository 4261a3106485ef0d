"""SWAG collection benchmark (issue 3): ``SWAGCollector.collect()`` on a ResNet-50-sized parameter set.

A timm ``resnet50`` (random init; its 159 backbone parameter tensors without ``fc``: 23.5M weights) with a
K = 20 ring buffer. Measured in one process, interleaved, median over repeats:

- copy: a plain copy of the selected parameters into a preallocated flat buffer (``buf[a:b].copy_(p)``),
  the reference of the issue's goal (collect ≤ 1.5× copy);
- clone: ``[p.detach().clone() for p]`` (what snapshotting by copy would allocate);
- collect: one ``collect()`` = finite check (one read of w) + the chunked Welford update (``lerp_``, ``sub``
  into the ring slot, ``addcmul_``) over cache-sized chunks;
- collect_unchunked: the same update with one op per whole tensor (``chunk_size`` = ∞), to show what
  fusing into cache-sized chunks buys;
- memory: the RSS high-water mark above the steady state during one operation (Linux
  ``/proc/self/clear_refs``), each in a fresh process after warm-up, i.e. the transient memory of one
  snapshot; plus the collector's persistent state, (K + 2)·P·4 bytes.

Bytes per weight: copy reads 4 and writes 4 (8 B); collect reads w twice (finite check + update), reads
and writes the mean and M₂, writes the deviation (4 + 4 + 8 + 8 + 4 = 28 B). A memory-bound collect is
therefore ≈ 3.5× a plain copy at best; the ``floor`` row streams those same 28 B/weight with plain copies
(``slot ← w; mean ← mean; m2 ← m2`` plus one read of w) so the ratio collect/floor says whether collect is
one streaming pass.

Run:  python benchmarks/bench_swag_collect.py [--repeats 7] [--rank 20] [--threads 1]
Writes benchmarks/results/swag_collect.json and benchmarks/results/swag_collect.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from priorzoo.learn import SWAGCollector

RESULTS = Path(__file__).parent / "results"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_extra_mib(fn: Callable[[], object]) -> float:
    """RSS high-water mark above the RSS before ``fn``, in MiB (Linux only; -1 elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return -1.0
    before = _rss_kib("VmRSS")
    keep = fn()
    peak = _rss_kib("VmHWM")
    del keep
    return (peak - before) / 1024


def _memory_in_child(op: str, rank: int, threads: int) -> float:
    """Peak extra RSS of one ``op`` measured in a fresh process (no allocator reuse from earlier runs)."""
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", op, "--rank", str(rank), "--threads", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(op: str, rank: int) -> None:
    """Build the model (and collector), warm up, then print the peak extra MiB of one ``op``."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False)
    params = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    if op.startswith("collect"):
        collector = SWAGCollector(model, rank=rank, chunk_size=1 << 40 if op == "collect_unchunked" else 1 << 18)
        collector.collect()
        collector.collect()
        fn: Callable[[], object] = collector.collect
    elif op == "clone":

        def fn() -> object:
            return [p.detach().clone() for p in params]
    else:
        flat = torch.zeros(sum(p.numel() for p in params))

        def fn() -> object:
            off = 0
            for p in params:
                flat[off : off + p.numel()].copy_(p.detach().view(-1))
                off += p.numel()
            return None

    print(_peak_extra_mib(fn))


def _median_time(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args.rank)
        return
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False)
    params = {n: p for n, p in model.named_parameters() if not n.startswith("fc.")}
    numel = sum(p.numel() for p in params.values())
    nbytes = numel * 4

    collector = SWAGCollector(model, rank=args.rank)  # the head `fc` is excluded (timm pretrained_cfg)
    unchunked = SWAGCollector(model, rank=args.rank, chunk_size=1 << 40)
    assert collector.num_parameters == numel
    flat = torch.empty(numel)
    offsets = []
    off = 0
    for p in params.values():
        offsets.append((off, off + p.numel()))
        off += p.numel()
    mean_buf, m2_buf, ring_slot = torch.empty(numel), torch.empty(numel), torch.empty(numel)
    mean_src, m2_src = torch.randn(numel), torch.randn(numel)

    def copy() -> None:
        for (a, b), p in zip(offsets, params.values()):
            flat[a:b].copy_(p.detach().view(-1))

    def clone() -> list[torch.Tensor]:
        return [p.detach().clone() for p in params.values()]

    def floor() -> None:  # the same 28 B/weight collect must move, as plain streaming copies
        for (a, b), p in zip(offsets, params.values()):
            w = p.detach().view(-1)
            w.sum()
            ring_slot[a:b].copy_(w)
        mean_buf.copy_(mean_src)
        m2_buf.copy_(m2_src)

    def perturb() -> None:
        with torch.no_grad():
            for p in params.values():
                p.add_(1e-4)

    for _ in range(2):  # warm-up: allocate buffers, fault pages in, fill the ring a little
        perturb()
        copy()
        floor()
        collector.collect()
        unchunked.collect()

    rows: dict[str, list[float]] = {"copy": [], "clone": [], "floor": [], "collect": [], "collect_unchunked": []}
    for _ in range(args.repeats):  # interleaved so load changes hit every variant alike
        rows["copy"] += _median_time(copy, 1)
        rows["clone"] += _median_time(clone, 1)
        rows["floor"] += _median_time(floor, 1)
        rows["collect"] += _median_time(collector.collect, 1, setup=perturb)
        rows["collect_unchunked"] += _median_time(unchunked.collect, 1, setup=perturb)
    med = {k: statistics.median(v) for k, v in rows.items()}
    mem = {
        op: _memory_in_child(op, args.rank, args.threads)
        for op in ("copy_into_buffer", "clone", "collect", "collect_unchunked")
    }
    state_mib = (collector._mean.numel() + collector._m2.numel() + collector._ring.numel()) * 4 / 2**20
    result = {
        "command": "python benchmarks/bench_swag_collect.py "
        f"--repeats {args.repeats} --rank {args.rank} --threads {args.threads}",
        "model": "timm resnet50 (random init), parameters without fc",
        "num_parameters": numel,
        "parameter_mib": nbytes / 2**20,
        "rank": args.rank,
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds_median": med,
        "seconds_all": rows,
        "ratio_collect_over_copy": med["collect"] / med["copy"],
        "ratio_collect_over_clone": med["collect"] / med["clone"],
        "ratio_collect_over_floor": med["collect"] / med["floor"],
        "ratio_unchunked_over_collect": med["collect_unchunked"] / med["collect"],
        "copy_gb_per_s": 2 * nbytes / med["copy"] / 1e9,
        "collect_gb_per_s_at_28_bytes_per_weight": 7 * nbytes / med["collect"] / 1e9,
        "peak_extra_mib": mem,
        "ratio_peak_collect_over_clone": mem["collect"] / mem["clone"] if mem["clone"] > 0 else None,
        "collector_state_mib": state_mib,
        "platform": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": list(os.getloadavg()),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swag_collect.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "swag_collect.md").write_text(render_markdown(result, chunk=collector.chunk_size))
    print((args.out / "swag_collect.md").read_text())


def render_markdown(r: dict, *, chunk: int) -> str:
    """The human summary of one result (``benchmarks/results/swag_collect.md``)."""
    med, mem = r["seconds_median"], r["peak_extra_mib"]
    ms = {k: 1e3 * v for k, v in med.items()}
    load = ", ".join(f"{x:.1f}" for x in r["platform"]["loadavg_at_end"])

    def verdict(ratio: float) -> str:
        return "met" if ratio <= 1.5 else "not met"

    def row(label: str, key: str, memory: str) -> str:
        return f"| {label} | {ms[key]:.1f} ms | {med[key] / med['copy']:.2f}× | {memory} |"

    lines = [
        "# SWAG collect() benchmark",
        "",
        f"Command: `{r['command']}` (CPU, {r['threads']} torch thread(s); load average at the end {load} on "
        f"{r['platform']['cpus']} cores: a shared machine).",
        "",
        f"ResNet-50 backbone (timm, random init, without `fc`): P = {r['num_parameters']:,} weights "
        f"({r['parameter_mib']:.0f} MiB float32), K = {r['rank']}. Median of {r['repeats']} interleaved repeats.",
        "",
        "| operation | time per snapshot | vs plain copy | peak extra memory |",
        "|---|---|---|---|",
        row("plain copy into a preallocated buffer", "copy", f"{mem['copy_into_buffer']:.0f} MiB"),
        row("clone of the parameters", "clone", f"{mem['clone']:.0f} MiB"),
        row("bandwidth floor of collect (28 B/weight as plain copies)", "floor", "–"),
        row("**`collect()`** (chunked, fused)", "collect", f"**{mem['collect']:.0f} MiB**"),
        row("`collect()` unchunked (one op per tensor)", "collect_unchunked", f"{mem['collect_unchunked']:.0f} MiB"),
        "",
        f'- Goal "collect ≤ 1.5× a plain copy": **{verdict(r["ratio_collect_over_copy"])}** '
        f"({r['ratio_collect_over_copy']:.2f}×). Against the bandwidth floor of what collect must move: "
        f"**{r['ratio_collect_over_floor']:.2f}×** ({verdict(r['ratio_collect_over_floor'])}); "
        f"collect / clone = {r['ratio_collect_over_clone']:.2f}×.",
        f"- Peak extra memory of one `collect()`: {mem['collect']:.0f} MiB, against {mem['clone']:.0f} MiB for a clone "
        f"of the parameters: the update works in place on the collector's buffers, {chunk:,} weights at a time. "
        f"The collector's persistent state is (K + 2)·P·4 B = {r['collector_state_mib']:.0f} MiB, allocated once.",
        "- A plain copy moves 8 B/weight; collect must move 28 B/weight (read w for the finite check and for the "
        "update, read and write the mean and M₂, write the deviation), so its floor is "
        f"{med['floor'] / med['copy']:.1f}× the copy here. Against that floor, collect is one streaming pass.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
