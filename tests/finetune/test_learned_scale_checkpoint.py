"""The learned scale's state survives checkpoints: LearnedScale.state_dict/load_state_dict in a plain loop (with and
without the background thread), and a Trainer run of 4 steps equals 2 steps + checkpoint + resume + 2 steps
(weights, λ_g, σ) through PriorCallback and PriorTrainer; tampered or missing state files are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _models import bert_prior, tiny_bert
from finetune_helpers import max_abs_diff, params_of, text_examples
from safetensors import safe_open
from safetensors.torch import save_file

from priorzoo import PriorModel
from priorzoo.finetune import PriorRegularizer
from priorzoo.finetune.learned_scale import LearnedScale
from priorzoo.finetune.learned_scale_checkpoint import STATE_FILE, load_learned_state, save_learned_state


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _reg(net: torch.nn.Module, overlap: bool) -> PriorRegularizer:
    mean = {n: p.detach() + 0.3 for n, p in _net().named_parameters() if n[0] == "0"}  # the same in every run
    prior = PriorModel.from_tensors(mean, variance=0.5, exclude=["2.*"])
    return PriorRegularizer(prior, net, num_train_examples=8, scale="learned", sigma_init=0.05, overlap=overlap)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1] * 4)


def _steps(net, reg, opt, start: int, stop: int) -> None:
    for i in range(start, stop):
        x, y = _batch(i)
        reg.perturb_()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        reg.add_to_grad_()
        opt.step()


@pytest.mark.parametrize("overlap", [True, False])
def test_state_dict_resumes_a_plain_loop_exactly(overlap, tmp_path):
    net = _net()
    reg = _reg(net, overlap)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _steps(net, reg, opt, 0, 4)
    expected = (params_of(net), reg.scales, reg.sigma)

    net = _net()
    reg = _reg(net, overlap)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _steps(net, reg, opt, 0, 2)
    save_learned_state(reg.learned, tmp_path, global_step=2)
    weights = params_of(net)
    net = _net()  # a fresh process: new model, new regulariser, weights from the "checkpoint"
    net.load_state_dict(weights)
    reg = _reg(net, overlap)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    load_learned_state(reg.learned, tmp_path, global_step=2)
    assert reg.learned.scales == pytest.approx(expected[1], rel=0.5)  # the saved λ_g, before any step
    _steps(net, reg, opt, 2, 4)
    assert max_abs_diff(params_of(net), expected[0]) == 0.0
    assert reg.scales == expected[1] and reg.sigma == expected[2]
    assert reg.sigma != pytest.approx(0.05)  # σ moved: restarting it would have shown


def _saved(tmp_path) -> LearnedScale:
    net = _net()
    reg = _reg(net, False)
    _steps(net, reg, torch.optim.SGD(net.parameters(), lr=0.1), 0, 2)
    save_learned_state(reg.learned, tmp_path, global_step=2)
    return _reg(_net(), False).learned


def _tamper(path, *, tensors=None, metadata=None) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    data.update(tensors or {})
    meta.update(metadata or {})
    save_file(data, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ({"tensors": {"rho": torch.tensor(float("nan"), dtype=torch.float64)}}, "`rho` must be finite"),
        ({"tensors": {"rho": torch.zeros(3, dtype=torch.float64)}}, r"`rho` must be a scalar.*shape \(3,\)"),
        ({"tensors": {"sigma_optimizer.exp_avg": torch.tensor(float("inf"))}}, "sigma_optimizer.exp_avg"),
        ({"metadata": {"groups": json.dumps({"encoder": 16, "head": 10})}}, r"groups \{'encoder': 16.*'backbone'"),
        ({"metadata": {"scales": json.dumps({"backbone": -1.0, "head": 1.0})}}, "finite and > 0"),
        ({"metadata": {"global_step": "7"}}, "saved at global step 7"),
    ],
)
def test_tampered_state_is_refused_and_nothing_changes(tamper, message, tmp_path):
    learned = _saved(tmp_path)
    _tamper(tmp_path / STATE_FILE, **tamper)
    sigma = learned.sigma
    with pytest.raises(ValueError, match=message):
        load_learned_state(learned, tmp_path, global_step=2)
    assert learned.sigma == sigma


# ---------------------------------------------------------------------- the Trainer
transformers = pytest.importorskip("transformers")

N, STEPS = 8, 4


@pytest.fixture(autouse=True)
def _quiet():
    transformers.logging.set_verbosity_error()


def _trainer(mode: str, output_dir, **kw):
    from priorzoo.finetune import PriorCallback, PriorTrainer

    model = tiny_bert()
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=2,
        seed=0,
        disable_tqdm=True,
        logging_steps=1,
        **kw,
    )
    data = text_examples(N)
    prior = bert_prior(model)
    if mode == "callback":
        cb = PriorCallback(prior, N, scale="learned", sigma_init=1e-2, sigma_lr=0.1)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
        return trainer, model, lambda: cb.regularizer
    trainer = PriorTrainer(
        model=model, args=args, train_dataset=data, prior=prior, scale="learned", prior_sigma_init=1e-2,
        prior_sigma_lr=0.1,
    )  # fmt: skip
    return trainer, model, lambda: trainer.prior_regularizer


@pytest.mark.parametrize("mode", ["callback", "mixin"])
def test_trainer_resume_equals_an_uninterrupted_run(mode, tmp_path):
    trainer, model, reg = _trainer(mode, tmp_path)
    trainer.train()  # 4 steps, checkpoints at 2 and 4
    expected, scales, sigma = params_of(model), reg().scales, reg().sigma
    assert (tmp_path / "checkpoint-2" / STATE_FILE).is_file()
    assert sigma != pytest.approx(1e-2)

    trainer, model, reg = _trainer(mode, tmp_path)  # a new process: fresh model, σ at sigma_init
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.state.global_step == STEPS
    assert max_abs_diff(params_of(model), expected) < 1e-6
    assert reg().scales == pytest.approx(scales, rel=1e-6) and reg().sigma == pytest.approx(sigma, rel=1e-9)


def test_trainer_resume_without_the_state_file_is_refused(tmp_path):
    trainer, _, _ = _trainer("mixin", tmp_path)
    trainer.train()
    (tmp_path / "checkpoint-2" / STATE_FILE).unlink()  # a checkpoint without it: σ must not silently restart
    shutil.rmtree(tmp_path / "checkpoint-4")
    trainer, _, _ = _trainer("callback", tmp_path)
    with pytest.raises(RuntimeError, match=r"global step 2 with scale='learned'.*checkpoint-2"):
        trainer.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir


def test_trainer_resume_with_a_tampered_state_is_refused(tmp_path):
    trainer, _, _ = _trainer("callback", tmp_path)
    trainer.train()
    _tamper(tmp_path / "checkpoint-2" / STATE_FILE, tensors={"rho": torch.tensor(float("nan"), dtype=torch.float64)})
    trainer, _, _ = _trainer("mixin", tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-2.*`rho` must be finite"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


# ---------------------------------------------------------------------- who writes, and how
@pytest.mark.parametrize(
    ("should_save", "world_zero", "written"),
    [
        (True, True, True),  # world rank 0
        (False, False, False),  # any other process
        (True, False, True),  # local rank 0 of another node with save_on_each_node: its own checkpoint needs it
    ],
)
def test_the_state_is_written_where_the_trainer_writes_its_checkpoint(should_save, world_zero, written, tmp_path):
    from types import SimpleNamespace

    from priorzoo.finetune.learned_scale_checkpoint import save_to_checkpoint

    learned = _reg(_net(), False).learned
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=should_save)
    save_to_checkpoint(learned, args, SimpleNamespace(global_step=2, is_world_process_zero=world_zero))
    assert (tmp_path / "checkpoint-2" / STATE_FILE).is_file() == written


def test_an_interrupted_save_leaves_the_previous_state(tmp_path, monkeypatch):
    """Two nodes writing one shared checkpoint folder, or a save killed half way, never leave a partial file."""
    import safetensors.torch

    learned = _saved(tmp_path)  # a good state, saved at step 2
    before = (tmp_path / STATE_FILE).read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(OSError, match="no space"):
        save_learned_state(learned, tmp_path, global_step=4)
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]  # no temporary file left behind
    load_learned_state(learned, tmp_path, global_step=2)
