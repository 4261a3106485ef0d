"""`torchrun --nproc_per_node 2 -m priorzoo.cli finetune …` (CPU, gloo): the Trainer runs DDP with no code of
ours, and two processes with half the batch each give the result of one process with the whole batch."""

from __future__ import annotations

import json

import pytest
import torch
from _models import tiny_bert_config
from _torchrun import TORCHRUN, run_torchrun
from test_finetune_cli import WORDS, _text_csv

from priorzoo.cli import main

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")


@pytest.fixture
def bert_no_dropout(tmp_path):
    """A tiny BertModel folder without dropout (every step deterministic) and its tokenizer."""
    from transformers import BertModel, BertTokenizerFast

    folder = tmp_path / "bert"
    folder.mkdir()
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=5 + len(WORDS), dropout=0.0)).save_pretrained(folder)
    return folder


def test_two_processes_give_the_one_process_result(bert_no_dropout, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    train = _text_csv(tmp_path / "train.csv", 16, 0)
    test = _text_csv(tmp_path / "test.csv", 8, 1)
    common = [
        "finetune", str(bert_no_dropout), "--l2sp", "0.01", "--data", str(train), "--test-data", str(test),
        "--epochs", "2", "--lr", "0.1", "--warmup", "0", "--max-length", "8", "--allow-failure", "--quiet",
    ]  # fmt: skip
    assert main([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0
    run_torchrun("priorzoo.cli", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "two"), module=True)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["training"]["map"]["steps"] == two["training"]["map"]["steps"] == 8
    for a, b in zip(one["training"]["map"]["history"], two["training"]["map"]["history"], strict=True):
        assert a["step"] == b["step"] and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert one["metrics"]["test"]["nll"] == pytest.approx(two["metrics"]["test"]["nll"], rel=1e-4)
    from safetensors.torch import load_file

    w1 = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    moved = float(w1["classifier.weight"].abs().max())  # the head starts at zero (init_head_)
    assert moved > 1e-3  # training moved the weights, so the equality below is not vacuous
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-3 * moved
