"""Learned scales on two processes (torchrun, gloo): DDP and FSDP2 take the same steps, and learn the same λ_g and σ,
as one process on the whole batch (group sums all-reduced over FSDP2's shards; the same noise on every process) — in
a plain loop, and through the transformers Trainer (PriorCallback and PriorTrainer), where 2 steps + checkpoint +
resume in fresh processes + 2 steps also equal 4 uninterrupted steps and every process holds the same state (σ, its
Adam, the noise generator)."""

from __future__ import annotations

import json
from pathlib import Path

import learned_scale_worker as worker
import pytest
from _torchrun import TORCHRUN, run_torchrun
from finetune_helpers import max_abs_diff

needs_torchrun = pytest.mark.skipif(
    TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH"
)


@needs_torchrun
@pytest.mark.parametrize("case", ["ddp", "fsdp"])
def test_two_processes_learn_the_scales_of_one_process(case, tmp_path):
    from safetensors.torch import load_file

    run_torchrun(Path(worker.__file__), str(tmp_path), case)
    params, learned = worker.run(case, world=1, rank=0)
    assert max_abs_diff(load_file(str(tmp_path / f"{case}.safetensors")), params) < 1e-6
    got = json.loads((tmp_path / f"{case}.json").read_text())
    assert sorted(got["scales"]) == ["0", "2", "head"]
    assert got["scales"] == pytest.approx(learned["scales"], rel=1e-5)
    assert got["sigma"] == pytest.approx(learned["sigma"], rel=1e-6)
    assert learned["sigma"] != pytest.approx(0.05, rel=1e-3)  # σ moved: its gradient entered


# ---------------------------------------------------------------------- the Trainer
@pytest.fixture(scope="module")
def trainer_worker():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import learned_trainer_worker

    return learned_trainer_worker


@pytest.fixture(scope="module")
def one_process(trainer_worker, tmp_path_factory):
    """Each Trainer kind on one process, the whole data set per step: kind -> (weights, {"scales", "sigma"})."""
    import transformers

    transformers.logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("one_process")
    return {kind: trainer_worker.train(out, kind, 1)[:2] for kind in trainer_worker.KINDS}


def _state(folder: Path) -> tuple[dict, dict]:
    """The tensors and metadata of a saved learned-scale state."""
    from safetensors import safe_open

    from priorzoo.finetune.learned_scale_checkpoint import STATE_FILE

    with safe_open(str(folder / STATE_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118


@needs_torchrun
@pytest.mark.parametrize("case", ["ddp", "fsdp"])
def test_trainer_on_two_processes_learns_and_resumes_like_one_process(case, trainer_worker, one_process, tmp_path):
    import torch
    from safetensors.torch import load_file

    from priorzoo.finetune.learned_scale_checkpoint import STATE_FILE

    run_torchrun(Path(trainer_worker.__file__), str(tmp_path), case, "run")  # 4 steps, checkpoints at 2 and 4
    run_torchrun(Path(trainer_worker.__file__), str(tmp_path), case, "resume")  # fresh processes, from step 2
    for kind, (params, learned) in one_process.items():
        assert (tmp_path / kind / "checkpoint-2" / STATE_FILE).is_file(), kind
        assert len(learned["scales"]) == 8 and learned["sigma"] != pytest.approx(1e-2, rel=1e-3)  # σ moved
        states = {}
        for phase in ("run", "resume"):
            for rank in (0, 1):
                name = f"{kind}_{phase}_{rank}"
                assert max_abs_diff(load_file(str(tmp_path / f"{name}.safetensors")), params) < 1e-6, name
                got = json.loads((tmp_path / f"{name}.json").read_text())
                assert got["scales"] == pytest.approx(learned["scales"], rel=1e-5), name
                assert got["sigma"] == pytest.approx(learned["sigma"], rel=1e-5), name
                states[phase, rank] = _state(tmp_path / name)
        for phase in ("run", "resume"):  # every process holds the same σ, Adam state and noise generator
            (t0, m0), (t1, m1) = states[phase, 0], states[phase, 1]
            assert m0 == m1 and t0.keys() == t1.keys(), (kind, phase)
            assert all(torch.equal(t0[k], t1[k]) for k in t0), (kind, phase)
        (run, meta_run), (resumed, meta_resumed) = states["run", 0], states["resume", 0]
        assert torch.equal(run["generator"], resumed["generator"])  # the resumed run continued the noise stream
        assert meta_run["step"] == meta_resumed["step"] == str(trainer_worker.STEPS)
