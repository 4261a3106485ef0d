"""GPU benchmark (issue 14): the prior step vs its memory-bandwidth floor vs the model's own step.

For ResNet-50 (timm, 23.5M weights in the prior) and a ~335M-parameter BERT-large-shaped transformer
(transformers ``BertForSequenceClassification``, 24 layers, hidden 1024), with a K = 20 factor stored in
float32 and in bfloat16, on one device:

- ``prior_add_to_grad_ms``: one ``PriorRegularizer.add_to_grad_()`` (value + gradient into ``.grad``);
- ``prior_loss_path_ms``: ``reg()`` + ``backward()`` (the loss path);
- ``floor_ms``: the bytes one step must move (both passes over F, ~76 B per weight of element-wise work:
  copy, residual, scaling, the Woodbury correction, the foreach add) divided by the device's measured copy
  bandwidth (a large ``clone``), i.e. the time at full memory bandwidth;
- ``model_step_ms``: forward + backward + SGD step of the model itself (bf16 autocast), at the batch given;
- ``ops``/``syncs``: ATen ops and host synchronisations of one ``add_to_grad_`` (a TorchDispatchMode count).

Device time is measured with CUDA events around ``--repeats`` steps after warm-up (``time.perf_counter``
with no events on CPU). The global TF32 setting is switched on (as training stacks do) to show that the
prior's products stay IEEE float32.

Run on a GPU:  python benchmarks/bench_gpu.py  [--repeats 20] [--rank 20]
    writes benchmarks/results/gpu.json and benchmarks/results/gpu.md
Smoke test (CPU, tiny models, seconds):  python benchmarks/bench_gpu.py --device cpu --tiny
    prints the table and writes nothing unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from priorzoo import PriorModel
from priorzoo.finetune import PriorRegularizer

RESULTS = Path(__file__).parent / "results"
ELEMENTWISE_BYTES_PER_WEIGHT = 76  # see the module docstring: what one add_to_grad_ reads/writes besides F
SYNC_OPS = ("_local_scalar_dense", "equal", "is_nonzero")


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.split("::")[-1]
        self.syncs += name in SYNC_OPS
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs (device time with CUDA events)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second of a device-to-device clone (read + write) of ``nbytes``."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    ms = timed(lambda: x.clone(), device, repeats=10)
    return 2 * x.numel() * 4 / (ms / 1e3)


def resnet50(tiny: bool):
    import timm

    name = "resnet18" if tiny else "resnet50"
    model = timm.create_model(name, pretrained=False, num_classes=10)
    size, batch = (32, 2) if tiny else (224, 32)

    def make_batch(device):
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, 3, size, size, generator=g).to(device), torch.randint(0, 10, (batch,)).to(device)

    def loss(model, b):
        return torch.nn.functional.cross_entropy(model(b[0]), b[1])

    return name, model, make_batch, loss, "fc."


def bert_large(tiny: bool):
    from transformers import BertConfig, BertForSequenceClassification

    if tiny:
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        batch, seq = 2, 16
    else:  # BERT-large shape: 335M parameters
        config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        batch, seq = 8, 128
    config.num_labels = 2
    model = BertForSequenceClassification(config)

    def make_batch(device):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
        return ids.to(device), torch.randint(0, 2, (batch,), generator=g).to(device)

    def loss(model, b):
        return torch.nn.functional.cross_entropy(model(input_ids=b[0]).logits, b[1])

    return ("bert-tiny" if tiny else "bert-large-335M"), model, make_batch, loss, "classifier."


def random_prior(model: torch.nn.Module, head: str, rank: int, factor_dtype: torch.dtype) -> PriorModel:
    g = torch.Generator().manual_seed(0)
    params = {n: p for n, p in model.named_parameters() if not n.startswith(head)}
    mean = {n: p.detach().cpu() + 0.01 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    var = {n: torch.rand(p.shape, generator=g) * 1e-3 + 1e-4 for n, p in params.items()}
    fac = {n: (torch.randn((rank, *p.shape), generator=g) * 1e-3).to(factor_dtype) for n, p in params.items()}
    return PriorModel.from_tensors(mean, var, fac, exclude=[f"{head}*"])


def bench_model(build, device: torch.device, rank: int, repeats: int, tiny: bool) -> list[dict]:
    name, model, make_batch, loss_fn, head = build(tiny)
    model.to(device).train()
    batch = make_batch(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def model_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()

    model_ms = timed(model_step, device, max(3, repeats // 4))
    rows = []
    for factor_dtype in (torch.float32, torch.bfloat16):
        prior = random_prior(model, head, rank, factor_dtype)
        reg = PriorRegularizer(prior, model, num_train_examples=50_000, overlap=False)
        del prior  # the binding holds its own device copy
        p_num = reg.bound.gaussian.numel
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        add_ms = timed(reg.add_to_grad_, device, repeats)

        loss_ms = timed(lambda reg=reg: reg().backward(), device, repeats)
        with _Count() as count:
            reg.add_to_grad_()
        factor_bytes = rank * p_num * factor_dtype.itemsize
        step_bytes = 2 * factor_bytes + ELEMENTWISE_BYTES_PER_WEIGHT * p_num
        rows.append(
            {
                "model": name,
                "factor_dtype": str(factor_dtype).removeprefix("torch."),
                "tensors": len(reg.parameters),
                "prior_weights": p_num,
                "rank": rank,
                "binding_bytes": reg.bound.gaussian.nbytes,
                "step_bytes": step_bytes,
                "prior_add_to_grad_ms": add_ms,
                "prior_loss_path_ms": loss_ms,
                "model_step_ms": model_ms,
                "ops": count.ops,
                "syncs": count.syncs,
            }
        )
        del reg
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.to("cpu")
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke test; seconds on a CPU)")
    ap.add_argument("--rank", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/gpu.json unless --tiny)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu --tiny for a smoke test")
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # as transformers/accelerate often do; the prior ignores it
    rank = 4 if args.tiny and args.rank == 20 else args.rank
    repeats = 3 if args.tiny and args.repeats == 20 else args.repeats
    bandwidth = copy_bandwidth(device, (64 << 20) if args.tiny else (2 << 30))
    rows = []
    for build in (resnet50, bert_large):
        rows += bench_model(build, device, rank, repeats, args.tiny)
    for row in rows:
        row["floor_ms"] = row["step_bytes"] / bandwidth * 1e3
        row["prior_vs_floor"] = row["prior_add_to_grad_ms"] / row["floor_ms"]
        row["prior_vs_model_step"] = row["prior_add_to_grad_ms"] / row["model_step_ms"]
    result = {
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "rows": rows,
    }
    lines = [
        f"# Prior step on {result['device']} (torch {result['torch']}; copy bandwidth "
        f"{result['copy_bandwidth_gb_per_s']:.0f} GB/s)",
        "",
        f"Command: `{result['command']}`",
        "",
        "| model | F dtype | tensors | P | add_to_grad_ | loss path | floor | model step | prior/floor | "
        "prior/model | ops | syncs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['factor_dtype']} | {r['tensors']} | {r['prior_weights'] / 1e6:.1f}M | "
            f"{r['prior_add_to_grad_ms']:.2f} ms | {r['prior_loss_path_ms']:.2f} ms | {r['floor_ms']:.2f} ms | "
            f"{r['model_step_ms']:.1f} ms | {r['prior_vs_floor']:.2f}× | {r['prior_vs_model_step']:.1%} | "
            f"{r['ops']} | {r['syncs']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out if args.out is not None else (None if args.tiny else RESULTS / "gpu.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
