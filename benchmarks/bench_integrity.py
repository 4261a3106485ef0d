"""Integrity soak benchmark (issue 19): readers racing writers on one prior folder, and kill -9 during a save.

Two experiments, each on a *target* (``LocalFolder`` here; a Hub-server target can be added beside it with the
same three methods: ``save``, ``load``, ``load_lazily``):

- **soak**: W writer processes each save N priors into one target, alternating the layout (one file, then
  shards); R reader processes load it in a loop until the writers are done, half the time with
  ``PriorModel.from_pretrained`` and half with ``priorzoo.binding.sharded.open_prior`` (every slice read). Every
  save is unique and self-describing — λ = v, every mean entry = v, every factor entry = v / 1000 for a value v
  no other save uses — so a loaded prior is *whole* when λ, all means and all factors agree, and *mixed*
  otherwise. Counted per load: whole, mixed, ``MixedPriorError`` (refused as files of two saves), other errors.
  Target: 0 mixed.
- **kill**: a child process saves two ~200 MB priors A and B into one folder in a loop (A one file, B shards);
  the parent kills it with SIGKILL at a random moment and classifies what the folder then reads as: A, B,
  ``MixedPriorError`` (killed between the tensor renames and the ``config.json`` rename: refused, and the old
  prior lost), mixed, or another error; then one more save must succeed there. The length of that window is
  timed too (``os.replace`` stamped in process), against the length of a save.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_integrity.py [--readers 4] [--writers 2] [--saves 50] [--kills 30]
Writes benchmarks/results/integrity.json and benchmarks/results/integrity.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from priorzoo import PriorModel
from priorzoo.errors import MixedPriorError

RESULTS = Path(__file__).parent / "results"
NAMES = [f"layer{i}.weight" for i in range(4)]


def make_prior(value: float, *, side: int = 256, rank: int = 4) -> PriorModel:
    """The self-describing prior of ``value``: λ = v, mean = v, factor = v / 1000 everywhere."""
    return PriorModel.from_tensors(
        {n: torch.full((side, side), value) for n in NAMES},
        {n: torch.full((side, side), 0.5) for n in NAMES},
        {n: torch.full((rank, side, side), value / 1000) for n in NAMES},
        scale=value,
        copy=False,
    )


def describe(prior: PriorModel) -> float | None:
    """The save's value when the prior is whole, ``None`` when it mixes two saves."""
    v = prior.scale
    means = {float(x) for n in NAMES for x in torch.aminmax(prior.mean[n][...])}
    factors = {round(float(x) * 1000, 3) for n in NAMES for x in torch.aminmax(prior.cov_factor[n][...])}
    return v if means == {v} and factors == {round(v, 3)} else None


class LocalFolder:
    """A prior folder on the local file system."""

    def __init__(self, path: str) -> None:
        self.path = path

    def save(self, prior: PriorModel, *, sharded: bool) -> None:
        prior.save_pretrained(self.path, max_shard_size=600_000 if sharded else "2GB")

    def load(self) -> PriorModel:
        return PriorModel.from_pretrained(self.path)

    def load_lazily(self) -> PriorModel:
        from priorzoo.binding.sharded import open_prior

        return open_prior(self.path)


TARGETS = {"local": LocalFolder}


# --------------------------------------------------------------------------------------------- roles (subprocesses)
def run_writer(target: Any, writer: int, saves: int) -> dict[str, Any]:
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    for j in range(saves):
        try:
            target.save(make_prior(1000.0 * (writer + 1) + j + 1), sharded=j % 2 == 1)
            done += 1
        except Exception as err:  # counted, reported
            errors[f"{type(err).__name__}: {str(err)[:120]}"] += 1
    return {"saves": done, "errors": dict(errors)}


def run_reader(target: Any, stop: Path, reader: int) -> dict[str, Any]:
    counts = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    seen = set()
    i = 0
    from priorzoo.format import serialization

    attempts = [0]
    real_open = serialization._open_once

    def counted(*args: Any, **kwargs: Any) -> Any:  # every read of the folder, first or re-read
        attempts[0] += 1
        return real_open(*args, **kwargs)

    serialization._open_once = counted
    while not stop.exists():
        lazy = (i + reader) % 2 == 1
        i += 1
        try:
            prior = target.load_lazily() if lazy else target.load()
        except MixedPriorError:
            counts["mixed_prior_error"] += 1
            continue
        except Exception as err:
            counts["other_error"] += 1
            errors[f"{type(err).__name__}: {str(err)[:160]}"] += 1
            continue
        value = describe(prior)
        counts["loads"] += 1
        counts["lazy_loads" if lazy else "whole_loads"] += 1
        if value is None:
            counts["mixed"] += 1
        else:
            seen.add(value)
    finished = counts["loads"] + counts["mixed_prior_error"] + counts["other_error"]
    return {**counts, "re_reads": attempts[0] - finished, "distinct_saves_seen": len(seen), "errors": dict(errors)}


def run_kill_child(folder: str, side: int) -> None:
    a, b = make_prior(1.0, side=side), make_prior(2.0, side=side)
    target = LocalFolder(folder)
    target.save(a, sharded=False)
    print("ready", flush=True)
    while True:
        target.save(b, sharded=True)
        target.save(a, sharded=False)


# --------------------------------------------------------------------------------------------- experiments
def _child(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def soak(kind: str, readers: int, writers: int, saves: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="priorzoo-soak-") as tmp:
        folder = os.path.join(tmp, "prior")
        TARGETS[kind](folder).save(make_prior(1.0), sharded=False)
        stop = Path(tmp) / "stop"
        start = time.perf_counter()
        rs = [
            _child(["--role", "reader", "--target", kind, "--path", folder, "--stop", str(stop), "--id", str(i)])
            for i in range(readers)
        ]
        time.sleep(3.0)  # the readers are loading before the first save lands
        ws = [
            _child(["--role", "writer", "--target", kind, "--path", folder, "--id", str(i), "--saves", str(saves)])
            for i in range(writers)
        ]
        w_out = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ws]
        stop.write_text("")
        r_out = []
        for p in rs:
            out, err = p.communicate()
            if p.returncode:
                raise RuntimeError(err[-2000:])
            r_out.append(json.loads(out.strip().splitlines()[-1]))
        seconds = time.perf_counter() - start
    total = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for r in r_out:
        errors.update(r.pop("errors"))
        total.update({k: v for k, v in r.items() if k != "distinct_saves_seen"})
    return {
        "target": kind,
        "readers": readers,
        "writers": writers,
        "saves_per_writer": saves,
        "saves_done": sum(w["saves"] for w in w_out),
        "writer_errors": sum(sum(w["errors"].values()) for w in w_out),
        "writer_error_kinds": [e for w in w_out for e in w["errors"]],
        "loads": total["loads"],
        "whole_loads": total["whole_loads"],
        "lazy_loads": total["lazy_loads"],
        "mixed": total["mixed"],
        "mixed_prior_error": total["mixed_prior_error"],
        "re_reads": total["re_reads"],
        "other_errors": total["other_error"],
        "other_error_kinds": dict(errors.most_common(5)),
        "distinct_saves_seen_per_reader": [r["distinct_saves_seen"] for r in r_out],
        "seconds": round(seconds, 1),
    }


def kill_test(kills: int, side: int, max_delay: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    details = []
    repaired = 0
    with tempfile.TemporaryDirectory(prefix="priorzoo-kill-") as tmp:
        folder = os.path.join(tmp, "prior")
        size_mb = len(NAMES) * (2 + 4) * side * side * 4 / 1e6  # mean, variance, K = 4 factor rows; float32
        for k in range(kills):
            child = _child(["--role", "kill-child", "--path", folder, "--side", str(side)])
            try:
                line = child.stdout.readline().strip()
                if line != "ready":
                    raise RuntimeError(f"kill child did not start: {line!r} {child.stderr.read()[-2000:]}")
                delay = rng.uniform(0.0, max_delay)
                time.sleep(delay)
            finally:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
            try:
                value = describe(PriorModel.from_pretrained(folder))
                outcome = {1.0: "A", 2.0: "B", None: "mixed"}.get(value, "mixed")
            except MixedPriorError:
                outcome = "mixed_prior_error"
            except Exception as err:
                outcome = f"other: {type(err).__name__}: {str(err)[:120]}"
            outcomes[outcome] += 1
            details.append({"delay_s": round(delay, 3), "outcome": outcome})
            if k == kills - 1 or outcome not in ("A", "B"):
                make_prior(3.0, side=8).save_pretrained(folder)  # a save into what the kill left must succeed
                repaired += describe(PriorModel.from_pretrained(folder)) is None
                make_prior(1.0, side=side).save_pretrained(folder)
    return {
        "kills": kills,
        "prior_mb": round(size_mb, 1),
        "max_delay_s": max_delay,
        "outcomes": dict(outcomes),
        "failed_repairs": repaired,
        "details": details,
    }


def rename_window(saves: int, side: int) -> dict[str, Any]:
    """How long a save's folder holds the new tensors under the old ``config.json``: from its first rename to
    the start of the ``config.json`` rename, against the whole save (``os.replace`` timed in process)."""
    real = os.replace
    stamps: list[tuple[float, str]] = []

    def timed(src: Any, dst: Any, **kwargs: Any) -> None:
        stamps.append((time.perf_counter(), str(dst)))
        real(src, dst, **kwargs)

    windows, durations = [], []
    with tempfile.TemporaryDirectory(prefix="priorzoo-window-") as tmp:
        target = LocalFolder(os.path.join(tmp, "prior"))
        priors = [make_prior(1.0, side=side), make_prior(2.0, side=side)]
        target.save(priors[1], sharded=False)
        os.replace = timed  # type: ignore[assignment]
        try:
            for j in range(saves):
                stamps.clear()
                start = time.perf_counter()
                target.save(priors[j % 2], sharded=j % 2 == 1)
                durations.append(time.perf_counter() - start)
                config_at = next(t for t, name in stamps if name == "config.json")
                windows.append(config_at - stamps[0][0])
        finally:
            os.replace = real  # type: ignore[assignment]
    window, duration = statistics.median(windows), statistics.median(durations)
    return {
        "saves": saves,
        "prior_mb": round(len(NAMES) * 6 * side * side * 4 / 1e6, 1),
        "window_us_median": round(window * 1e6, 1),
        "window_us_max": round(max(windows) * 1e6, 1),
        "save_s_median": round(duration, 3),
        "kill_in_window_probability": window / duration,
    }


def write_results(result: dict[str, Any], command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "integrity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Integrity soak benchmark (issue 19)", "", f"Command: `{command}`", ""]
    lines.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, 1 thread per process."
    )
    lines += ["", "## Readers × writers on one folder", ""]
    lines += [
        "| target | readers × writers × saves | saves done | writer errors | loads (whole / lazy) | **mixed** |"
        " `MixedPriorError` | other errors | re-reads | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["soak"]:
        lines.append(
            f"| {s['target']} | {s['readers']} × {s['writers']} × {s['saves_per_writer']} | {s['saves_done']} | "
            f"{s['writer_errors']} | {s['loads']} ({s['whole_loads']} / {s['lazy_loads']}) | **{s['mixed']}** | "
            f"{s['mixed_prior_error']} | {s['other_errors']} | {s['re_reads']} | {s['seconds']} |"
        )
    for s in result["soak"]:
        if s["other_error_kinds"] or s["writer_error_kinds"]:
            lines += ["", f"Errors ({s['target']}): {s['other_error_kinds']} {s['writer_error_kinds']}"]
    k = result["kill"]
    lines += ["", "## kill -9 during a save", ""]
    lines.append(
        f"{k['kills']} kills of a process saving a {k['prior_mb']} MB prior (A: one file) and its replacement "
        f"(B: shards) into one folder in a loop, each at a random moment up to {k['max_delay_s']} s after it was "
        f"ready. What the folder read as afterwards: {k['outcomes']}. Saves into the folder after each refused "
        f"state and the last kill: {k['failed_repairs']} failed."
    )
    w = result.get("window")
    if w:
        lines += [
            "",
            f"The window in which a kill leaves the new tensors under the old `config.json` (first rename of a save to "
            f"the start of its `config.json` rename), over {w['saves']} saves of the {w['prior_mb']} MB prior: median "
            f"{w['window_us_median']} µs (max {w['window_us_max']} µs) of a {w['save_s_median']} s save, so a kill at "
            f"a uniformly random moment of a save lands in it with probability ≈ {w['kill_in_window_probability']:.1e} "
            "(and then leaves a folder readers refuse with `MixedPriorError`, not a mixture).",
        ]
    lines += [
        "",
        "Reading: **mixed** counts priors whose λ, means and factors come from different saves — the failure this "
        "benchmark exists to catch (target 0). `MixedPriorError` counts loads refused because the files carried "
        "different save ids after the re-read window (2 s while a save holds the folder's lock); re-reads counts "
        "reads that found files of two saves (or a file a save had just removed) and read the folder again — "
        "how often the race happened. In the kill test, "
        "`mixed_prior_error` is the documented window between the first tensor rename and the `config.json` "
        "rename: the folder is refused (never read as a mixture) and the old prior is lost until the next save.",
    ]
    (RESULTS / "integrity.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["main", "reader", "writer", "kill-child"], default="main")
    parser.add_argument("--target", choices=sorted(TARGETS), default="local")
    parser.add_argument("--path")
    parser.add_argument("--stop")
    parser.add_argument("--id", type=int, default=0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--saves", type=int, default=50)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--side", type=int, default=1448, help="kill test: tensors side×side (1448: a 201 MB prior)")
    parser.add_argument("--max-delay", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window-saves", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role == "reader":
        print(json.dumps(run_reader(TARGETS[args.target](args.path), Path(args.stop), args.id)), flush=True)
        return
    if args.role == "writer":
        print(json.dumps(run_writer(TARGETS[args.target](args.path), args.id, args.saves)), flush=True)
        return
    if args.role == "kill-child":
        run_kill_child(args.path, args.side)
        return
    result = {
        "soak": [soak(args.target, args.readers, args.writers, args.saves)],
        "kill": kill_test(args.kills, args.side, args.max_delay, args.seed),
        "window": rename_window(args.window_saves, args.side),
    }
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_integrity.py " + " ".join(sys.argv[1:])
    write_results(result, command.strip())
    print(json.dumps({k: v for k, v in result.items()}, indent=2)[:4000])


if __name__ == "__main__":
    main()
