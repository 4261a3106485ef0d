"""Run a test worker under torchrun (CPU, gloo) in a clean distributed environment; one copy for every
multi-process test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TORCHRUN = shutil.which("torchrun")


def run_torchrun(
    worker: str | os.PathLike, *args: str, nproc: int = 2, timeout: int = 300, module: bool = False
) -> None:
    """Run ``torchrun --standalone --nproc_per_node=nproc worker *args`` (``module``: ``-m worker``, a module
    name such as ``priorzoo.cli``); fail with its output if it fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    target = ["-m", str(worker)] if module else [str(worker)]
    if not module:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(worker).parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *target, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
