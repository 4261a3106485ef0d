"""Hub integrity soak benchmark (issues 19 and 23): readers loading a prior while a pusher replaces it on the Hub.

A Hub-protocol server (``tests/hub_server.py``, real HTTP on 127.0.0.1, a few ms of latency per request so
that the windows between requests are real) holds one repo. One *pusher* process pushes N priors to it with
``push_to_hub``, alternating the layout (one file, then shards, so that every other push deletes the other
layout's files); R *reader* processes, each with a huggingface_hub cache of its own (so that each downloads
every new commit), load it in a loop until the pusher is done. Every prior is self-describing
(``bench_integrity.make_prior``: λ = v, every mean = v, every factor = v / 1000), so a loaded prior is *whole*
when they agree and *mixed* otherwise. Counted per load: whole, mixed, ``MixedPriorError`` (refused: files of
two saves), other errors.

Two kinds of reader:

- ``priorzoo``: ``PriorModel.from_pretrained(repo)`` — one resolved commit, every file at it, a mixed cached
  copy fetched again (target: 0 mixed, 0 refused);
- ``hf-main``: what a reader built on ``hf_hub_download`` alone does (priorzoo before issue 23): ``config.json``
  at ``main`` (huggingface_hub HEADs ``main`` and then GETs the ``main`` URL), the tensors at the commit that HEAD
  named, then the loader on the snapshot folder. A push between the HEAD and the GET leaves the next save's
  ``config.json`` in the old commit's snapshot of the cache; the loader's save-id check refuses it
  (``MixedPriorError``) instead of returning a mixture, every time that snapshot is read again.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_hub_integrity.py [--readers 3] [--pushes 60] [--latency 0.02]
Writes benchmarks/results/hub_integrity.json and benchmarks/results/hub_integrity.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_integrity import describe, make_prior  # noqa: E402

from priorzoo import PriorModel  # noqa: E402
from priorzoo.errors import MixedPriorError  # noqa: E402

RESULTS = HERE / "results"
REPO = "soak/prior"


def load_hf_main(repo: str) -> PriorModel:
    """A reader on ``hf_hub_download`` alone: config at ``main``, the rest at the commit its HEAD named."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from priorzoo.format.files import INDEX_NAME, WEIGHTS_NAME, read_shard_index

    config = Path(hf_hub_download(repo, "config.json"))
    commit = config.parent.name
    try:
        hf_hub_download(repo, WEIGHTS_NAME, revision=commit)
    except EntryNotFoundError:
        index = Path(hf_hub_download(repo, INDEX_NAME, revision=commit))
        for shard in sorted(set(read_shard_index(index).values())):
            hf_hub_download(repo, shard, revision=commit)
    return PriorModel.from_pretrained(config.parent)


def run_reader(kind: str, stop: Path) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    seen = set()
    while not stop.exists():
        try:
            prior = PriorModel.from_pretrained(REPO) if kind == "priorzoo" else load_hf_main(REPO)
        except MixedPriorError:
            counts["mixed_prior_error"] += 1
            continue
        except Exception as err:
            counts["other_error"] += 1
            errors[f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"] += 1
            continue
        value = describe(prior)
        counts["loads"] += 1
        if value is None:
            counts["mixed"] += 1
        else:
            seen.add(value)
    return {**counts, "distinct_saves_seen": len(seen), "errors": dict(errors)}


def run_pusher(pushes: int, side: int) -> dict[str, Any]:
    errors: collections.Counter[str] = collections.Counter()
    done = 0
    for j in range(pushes):
        try:
            prior = make_prior(float(j + 2), side=side)
            prior.push_to_hub(REPO, max_shard_size=side * side * 4 * 3 if j % 2 else "2GB")
            done += 1
        except Exception as err:  # counted, reported
            errors[f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"] += 1
    return {"pushes": done, "errors": dict(errors)}


def _child(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def soak(kind: str, readers: int, pushes: int, side: int, latency: float) -> dict[str, Any]:
    from hub_server import HubServer

    with HubServer() as server, tempfile.TemporaryDirectory(prefix="priorzoo-hub-soak-") as tmp:
        server.on_request = lambda method, path: time.sleep(latency)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_ENDPOINT": server.url,
            "HF_HOME": str(Path(tmp) / "home"),
            "HF_TOKEN": server.token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        first = _child(["--role", "pusher", "--pushes", "1", "--side", str(side)], env)  # the repo exists
        if first.wait():
            raise RuntimeError(first.stderr.read()[-2000:])
        stop = Path(tmp) / "stop"
        start = time.perf_counter()
        # each reader has a cache of its own, so that each downloads every new commit (a shared cache: one does)
        rs = [
            _child(["--role", "reader", "--kind", kind, "--stop", str(stop)], {**env, "HF_HOME": f"{tmp}/home-{i}"})
            for i in range(readers)
        ]
        time.sleep(3.0)  # the readers are loading before the first push lands
        pusher = _child(["--role", "pusher", "--pushes", str(pushes), "--side", str(side)], env)
        out, err = pusher.communicate()
        if pusher.returncode:
            raise RuntimeError(err[-2000:])
        p_out = json.loads(out.strip().splitlines()[-1])
        time.sleep(1.0)
        stop.write_text("")
        r_out = []
        for p in rs:
            out, err = p.communicate()
            if p.returncode:
                raise RuntimeError(err[-2000:])
            r_out.append(json.loads(out.strip().splitlines()[-1]))
        seconds = time.perf_counter() - start
        commits = server.commit_count(REPO)
    total: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    for r in r_out:
        errors.update(r.pop("errors"))
        total.update({k: v for k, v in r.items() if k != "distinct_saves_seen"})
    return {
        "reader": kind,
        "readers": readers,
        "pushes": pushes,
        "pushes_done": p_out["pushes"],
        "pusher_errors": p_out["errors"],
        "repo_commits": commits,
        "loads": total["loads"],
        "mixed": total["mixed"],
        "mixed_prior_error": total["mixed_prior_error"],
        "other_errors": total["other_error"],
        "other_error_kinds": dict(errors.most_common(5)),
        "distinct_saves_seen_per_reader": [r["distinct_saves_seen"] for r in r_out],
        "seconds": round(seconds, 1),
    }


def write_results(result: dict[str, Any], command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hub_integrity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Hub integrity soak benchmark (issues 19 and 23)", "", f"Command: `{command}`", ""]
    lines.append(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), load average at the end "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; torch {torch.__version__}, huggingface_hub "
        f"{result['huggingface_hub']}; local Hub server `tests/hub_server.py` with {result['latency_s'] * 1000:g} ms "
        f"per request; prior of {result['prior_kb']} kB (4 tensors of {result['side']}², K = 4)."
    )
    lines += [
        "",
        "| reader | readers × pushes | pushes done | loads | **mixed** | `MixedPriorError` | other errors | "
        "saves seen per reader | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["soak"]:
        lines.append(
            f"| {s['reader']} | {s['readers']} × {s['pushes']} | {s['pushes_done']} | {s['loads']} | "
            f"**{s['mixed']}** | {s['mixed_prior_error']} | {s['other_errors']} | "
            f"{s['distinct_saves_seen_per_reader']} | {s['seconds']} |"
        )
    for s in result["soak"]:
        if s["other_error_kinds"] or s["pusher_errors"]:
            lines += ["", f"Errors ({s['reader']}): {s['other_error_kinds']} {s['pusher_errors']}"]
    lines += [
        "",
        "Reading: **mixed** counts loaded priors whose λ, means and factors come from different pushes (target 0). "
        "`MixedPriorError` counts loads refused because the files carried different save ids: for the `hf-main` "
        "reader these are the cache snapshots that huggingface_hub's HEAD-then-GET of `main` poisoned while a push "
        "landed (the loader refuses them rather than return a mixture, and refuses that commit's snapshot whenever "
        "it is read again), for `priorzoo` they would be snapshots still mixed after a fresh download at the resolved "
        "commit (target 0).",
    ]
    (RESULTS / "hub_integrity.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["main", "reader", "pusher"], default="main")
    parser.add_argument("--kind", choices=["priorzoo", "hf-main"], default="priorzoo")
    parser.add_argument("--stop")
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--pushes", type=int, default=60)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.02, help="seconds the server waits per request")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.role == "reader":
        print(json.dumps(run_reader(args.kind, Path(args.stop))), flush=True)
        return
    if args.role == "pusher":
        print(json.dumps(run_pusher(args.pushes, args.side)), flush=True)
        return
    import huggingface_hub

    result = {
        "huggingface_hub": huggingface_hub.__version__,
        "latency_s": args.latency,
        "side": args.side,
        "prior_kb": round(4 * 6 * args.side * args.side * 4 / 1000),
        "soak": [soak(kind, args.readers, args.pushes, args.side, args.latency) for kind in ("priorzoo", "hf-main")],
    }
    command = "OMP_NUM_THREADS=1 python benchmarks/bench_hub_integrity.py " + " ".join(sys.argv[1:])
    write_results(result, command.strip())
    print(json.dumps(result, indent=2)[:4000])


if __name__ == "__main__":
    main()
