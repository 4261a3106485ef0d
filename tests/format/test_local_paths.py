"""priorzoo.format.local_paths: published provenance names local files by name (and sha256), never by path."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.format.local_paths import file_record, public_name, strip_local_paths


def _local(tmp_path) -> list[str]:
    return [str(tmp_path), os.path.expanduser("~")]


def _mentions(folder, needles: list[str]) -> list[str]:
    return [f"{f.name}: {n}" for f in folder.rglob("*") if f.is_file() for n in needles if n.encode() in f.read_bytes()]


def test_names_records_and_the_safety_net(tmp_path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"weights")
    assert file_record(path) == {"file": "w.bin", "sha256": hashlib.sha256(b"weights").hexdigest()}
    with pytest.raises(FileNotFoundError, match="no file at"):
        file_record(tmp_path / "missing.bin")
    assert public_name(tmp_path / "w.bin") == "w.bin"
    assert public_name("org/name") == "org/name" and public_name("resnet18") == "resnet18"
    text = {"a": [f"from {tmp_path}/data.csv, see https://huggingface.co/org/name", "~/x/y"], "n": 1}
    assert strip_local_paths(text) == {"a": ["from data.csv, see https://huggingface.co/org/name", "y"], "n": 1}


def test_a_saved_prior_holds_no_local_path_from_any_api(tmp_path) -> None:
    """SWAGCollector.to_prior and the baselines on a transformers model from a local folder, with provenance
    that names local paths: the saved folder mentions none of them."""
    transformers = pytest.importorskip("transformers")
    from _models import tiny_bert_config

    from priorzoo.learn import SWAGCollector, isotropic_prior

    folder = tmp_path / "models" / "tiny-bert"
    transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2)).save_pretrained(folder)
    model = transformers.BertForSequenceClassification.from_pretrained(folder)
    collector = SWAGCollector(model, rank=2)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        collector.collect()
    local = {"dataset": str(tmp_path / "data" / "train.csv"), "notes": f"cache at {tmp_path}/cache/x"}
    priors = {
        "swag": collector.to_prior(source=local, learning={"output_dir": str(tmp_path / "out")}),
        "isotropic": isotropic_prior(model, variance=1.0, source=local),
        "explicit": PriorModel.from_tensors(
            {"w": torch.zeros(2)}, variance={"w": torch.ones(2)}, backbone={"name": str(folder)}, source=local
        ),
    }
    for kind, prior in priors.items():
        out = prior.save_pretrained(tmp_path / "saved" / kind)
        assert _mentions(out, _local(tmp_path)) == [], kind
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["source"]["dataset"] == "train.csv"
        if kind != "explicit":
            assert cfg["backbone"]["name"] == "tiny-bert"
