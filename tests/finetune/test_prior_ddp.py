"""DDP: two CPU processes (gloo, torchrun) take the same step as one process on the same global batch, for
the callback, the Trainer mixin and a plain DDP loop; the prior term enters once, not once per process."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune_helpers import max_abs_diff

pytest.importorskip("transformers")
pytest.importorskip("timm")

import ddp_prior_worker as worker
from _torchrun import TORCHRUN, run_torchrun


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun (torch.distributed.run's launcher) is not on PATH")
def test_two_processes_equal_one_process(tmp_path):
    import transformers
    from safetensors.torch import load_file

    run_torchrun(Path(worker.__file__), str(tmp_path))

    transformers.logging.set_verbosity_error()
    single = worker.run_all(tmp_path / "single", world=1, rank=0)
    for name, params in single.items():
        ddp = load_file(str(tmp_path / f"{name}.safetensors"))
        assert max_abs_diff(ddp, params) < 1e-6, name

    # the comparison is sharp: counting the prior once per process (twice) would move these weights
    from _models import bert_prior, tiny_bert

    from priorzoo.finetune import PriorRegularizer

    model = tiny_bert()
    g = PriorRegularizer(bert_prior(model), model, num_train_examples=worker.N).gradient()
    assert max(float(t.abs().max()) for t in g) * worker.LR > 1e-2
