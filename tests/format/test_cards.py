"""Model cards: render, parse with huggingface_hub.ModelCard, carry the metadata; model-index round trip."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

import priorzoo.finetune
from priorzoo import PriorModel
from priorzoo.format.cards import card_metadata, model_index, render_card, result_rows
from priorzoo.format.config import ParameterSpec, PriorConfig

RESULTS = [
    {"task": "image-classification", "dataset": "cifar10", "dataset_name": "CIFAR-10", "split": "test",
     "metric": "accuracy", "value": 0.732, "method": "SGD", "num_train_examples": 1000},
    {"task": "image-classification", "dataset": "cifar10", "dataset_name": "CIFAR-10", "split": "test",
     "metric": "accuracy", "value": 0.784, "method": "SGD + learned prior", "num_train_examples": 1000, "scale": 1e5},
    {"task": "image-classification", "dataset": "oxford_flowers102", "metric": "nll", "value": 1.25,
     "method": "SGD + learned prior", "source_name": "priorzoo benchmarks", "source_url": "https://example.org/b"},
    {"task": "image-classification", "dataset": "cifar10", "metric": "accuracy", "value": "n/a", "notes": "diverged"},
]  # fmt: skip


def swag_config(**overrides: Any) -> PriorConfig:
    base: dict[str, Any] = dict(
        kind="swag",
        rank=20,
        parameters=[ParameterSpec("conv1.weight", (8, 3, 3, 3)), ParameterSpec("layer1.0.bn1.weight", (8,))],
        backbone={"library": "timm", "name": "resnet50.a1_in1k", "hub_id": "timm/resnet50.a1_in1k", "pretrained": True},
        source={"dataset": "ImageNet-1k", "hub_id": "ILSVRC/imagenet-1k", "objective": "supervised"},
        learning={"method": "swag", "snapshots": 40, "rank": 20, "lr": 0.001, "schedule": "constant", "epochs": 10},
        exclude=["fc.*"],
        recommended_scale=1e5,
        license="Apache-2.0",
        results=RESULTS,
    )
    base.update(overrides)
    return PriorConfig(**base)


def front_matter(text: str) -> dict[str, Any]:
    m = re.match(r"\A---\n(.*?)\n---\n", text, re.S)
    assert m, "the card must start with YAML front matter"
    return yaml.safe_load(m[1])


def code_blocks(text: str, lang: str = "python") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


# ------------------------------------------------------------------------------------------- metadata
def test_card_parses_with_model_card_and_carries_the_metadata() -> None:
    cfg = swag_config()
    text = render_card(cfg, repo_id="priorzoo/resnet50-imagenet1k-swag")
    card = ModelCard(text)  # raises on invalid YAML or an unparsable model-index
    data = card.data
    assert data.library_name == "priorzoo"
    assert data.license == "apache-2.0"
    assert data.tags == ["priorzoo", "bayesian-prior", "swag", "transfer-learning", "timm"]
    assert data.base_model == "timm/resnet50.a1_in1k"
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    assert data.model_name == "priorzoo/resnet50-imagenet1k-swag"
    assert len(data.eval_results) == 3  # the non-numeric "n/a" stays out of the model-index
    assert front_matter(text) == card_metadata(cfg, repo_id="priorzoo/resnet50-imagenet1k-swag")


def test_model_index_round_trips_through_huggingface_hub() -> None:
    cfg = swag_config()
    index = model_index(cfg, name="org/prior")
    name, evals = model_index_to_eval_results(index)
    assert name == "org/prior"
    assert eval_results_to_model_index(name, evals) == index  # exactly huggingface_hub's structure
    by_value = {e.metric_value: e for e in evals}
    assert by_value[0.784].metric_name == "accuracy (SGD + learned prior, N=1000, λ=100000)"
    assert by_value[0.784].dataset_split == "test"
    assert by_value[1.25].source_url == "https://example.org/b"
    # two CIFAR-10 numbers share one (task, dataset, split) entry, as huggingface_hub groups them
    assert [len(r["metrics"]) for r in index[0]["results"]] == [2, 1]
    # and the whole card survives ModelCard's own parse → dump
    card = ModelCard(render_card(cfg, repo_id="org/prior"))
    assert card.data.to_dict()["model-index"] == index


def test_card_without_results_or_provenance_is_valid() -> None:
    cfg = PriorConfig(kind="diagonal", rank=0, parameters=[ParameterSpec("w", (3,))])
    text = render_card(cfg)
    meta = front_matter(text)
    assert meta == {
        "library_name": "priorzoo",
        "tags": ["priorzoo", "bayesian-prior", "diagonal", "transfer-learning"],
    }  # no `license: other` without a license_name: an unknown license is left out
    card = ModelCard(text)
    assert card.data.eval_results is None
    assert "No transfer results were recorded" in text
    assert "No λ was measured" in text
    assert text == render_card(cfg)  # deterministic


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ({"library": "timm", "name": "resnet50"}, None),  # which weights? ambiguous: left out
        ({"library": "timm", "name": "resnet50.a1_in1k"}, "timm/resnet50.a1_in1k"),
        ({"library": "timm", "name": "test_resnet", "pretrained": False}, None),  # trained from scratch
        ({"library": "transformers", "name": "google-bert/bert-base-uncased"}, "google-bert/bert-base-uncased"),
        ({"library": "transformers", "name": "/usr/lib/models/minilm"}, None),  # a local folder is no Hub id
        ({"library": "torch", "architecture": "Net", "hub_id": "org/net"}, "org/net"),
    ],
)
def test_base_model_only_when_it_is_a_hub_id(backbone: dict[str, Any], expected: str | None) -> None:
    cfg = PriorConfig(kind="isotropic", rank=0, parameters=[ParameterSpec("w", (2,))], backbone=backbone)
    assert card_metadata(cfg).get("base_model") == expected
    assert ModelCard(render_card(cfg)).data.base_model == expected


def test_result_rows_default_the_task_from_the_backbone() -> None:
    text_cfg = PriorConfig(
        kind="swag",
        rank=2,
        parameters=[ParameterSpec("w", (2,))],
        backbone={"library": "transformers", "name": "org/bert"},
        results=[{"dataset": "imdb", "metric": "accuracy", "value": 0.9}],
    )
    assert result_rows(text_cfg)[0]["task"] == "text-classification"
    with pytest.raises(TypeError, match=r"results\[0\]"):
        result_rows(PriorConfig(kind="swag", rank=2, parameters=[ParameterSpec("w", (2,))], results=["oops"]))


# ------------------------------------------------------------------------------------------- body
def test_body_says_what_how_lambda_and_results() -> None:
    text = render_card(swag_config(), repo_id="priorzoo/resnet50-imagenet1k-swag", description="A test prior.")
    body = text.split("\n---\n", 1)[1]
    assert "A test prior." in body
    assert "SWAG" in body and "| rank K (rows of the low-rank factor) | 20 |" in body
    assert "| source data | ImageNet-1k |" in body and "| objective | supervised |" in body
    assert "| snapshots | 40 |" in body and "| lr | 0.001 |" in body
    assert "**λ = 100000**" in body
    assert "| image-classification | CIFAR-10 (test) | SGD + learned prior | 1000 | 100000 | accuracy | 0.784 |" in body
    assert "| n/a | diverged |" in body  # non-numeric results still shown in the table
    assert "`fc.*`" in body


def test_transformers_snippet_matches_the_library_api() -> None:
    cfg = swag_config(
        backbone={"library": "transformers", "name": "google-bert/bert-base-uncased", "model_type": "bert"},
        source={"dataset": "wikitext", "objective": "mlm"},
        results=[],
    )
    text = render_card(cfg, repo_id="org/bert-prior")
    code = "\n".join(code_blocks(text))
    assert 'AutoModelForSequenceClassification.from_pretrained("google-bert/bert-base-uncased"' in code
    assert "callbacks=[PriorCallback(prior, num_train_examples=len(train_dataset), scale=100000)]" in code
    assert "prior.penalty(model) / N" in code
    # the names the snippet uses exist with these parameters (read from the source: no transformers import)
    assert "PriorCallback" in priorzoo.finetune.__all__
    source = Path(priorzoo.finetune.__file__).with_name("callback.py").read_text(encoding="utf-8")
    init = next(
        node
        for cls in ast.walk(ast.parse(source))
        if isinstance(cls, ast.ClassDef) and cls.name == "PriorCallback"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    names = [a.arg for a in init.args.args + init.args.kwonlyargs]
    assert {"prior", "num_train_examples", "scale"} <= set(names)
    for block in code_blocks(text):
        compile(block, "<card snippet>", "exec")  # every snippet is valid Python


def test_timm_snippet_runs_as_written(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    head = set(source.pretrained_cfg["classifier"].split(","))
    mean = {n: p.detach().clone() for n, p in source.named_parameters() if n.rsplit(".", 1)[0] not in head}
    prior = PriorModel.from_tensors(
        mean,
        variance={n: torch.full_like(m, 1e-4) for n, m in mean.items()},
        backbone={"library": "timm", "name": "test_efficientnet", "pretrained": False},
        exclude=[f"{h}.*" for h in head],
        recommended_scale=10.0,
    )
    folder = prior.save_pretrained(tmp_path / "prior")
    text = render_card(prior.config, repo_id=str(folder))  # a local folder works as the "repo id"
    snippet = next(b for b in code_blocks(text) if "import timm" in b)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    namespace: dict[str, Any] = {
        "NUM_CLASSES": 5,
        "train_dataset": list(zip(x, y)),
        "train_loader": [(x[:2], y[:2]), (x[2:], y[2:])],
    }
    exec(compile(snippet, "<timm snippet>", "exec"), namespace)
    model = namespace["model"]
    assert model.get_classifier().out_features == 5
    assert namespace["prior"].scale == 10.0
    assert torch.isfinite(namespace["loss"])


def test_save_pretrained_writes_a_card_that_parses(tmp_path: Path) -> None:
    prior = PriorModel.from_tensors(
        {"w": torch.zeros(2, 2)},
        variance={"w": torch.ones(2, 2)},
        cov_factor={"w": torch.ones(3, 2, 2)},
        license="MIT",
        results=[{"dataset": "mnist", "metric": "accuracy", "value": 0.5}],
    )
    folder = prior.save_pretrained(tmp_path / "p")
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "priorzoo"
    assert card.data.license == "mit"
    assert card.data.eval_results[0].metric_value == 0.5


@pytest.mark.parametrize("library", ["timm", "transformers", "torch"])
def test_config_strings_cannot_break_out_of_the_usage_snippets(library):
    evil = 'x", pretrained=True)\nimport os; os.system("echo pwned")  # '
    cfg = PriorConfig(
        kind="swag",
        rank=2,
        parameters=[ParameterSpec("w", (2,))],
        backbone={"library": library, "name": evil, "architecture": evil},
        learning={"repo_id": "org/p'; rm -rf ~; echo '"},
    )
    card = render_card(cfg)
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert blocks
    for code in blocks:
        tree = ast.parse(code)  # still valid Python
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        assert "os" not in names
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "system"]
        assert not calls
    shell = re.findall(r"```bash\n(.*?)```", card, flags=re.S)[0]
    assert "priorzoo pull 'org/p'\"'\"'; rm -rf ~; echo '\"'\"''" in shell


def test_random_init_and_local_data_claim_no_hub_provenance() -> None:
    cfg = PriorConfig(
        kind="swag",
        rank=0,
        parameters=[ParameterSpec("w", (3,))],
        backbone={"library": "timm", "name": "resnet18", "hub_id": "timm/resnet18.a1_in1k", "pretrained": False},
        source={"dataset": "images", "local": True},
    )
    meta = card_metadata(cfg)
    assert "base_model" not in meta and "datasets" not in meta and "license" not in meta
