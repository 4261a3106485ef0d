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
    {"task": "image-classification", "dataset": "uoft-cs/cifar10", "hub_dataset": True, "dataset_name": "CIFAR-10",
     "split": "test", "metric": "accuracy", "value": 0.732, "method": "SGD", "num_train_examples": 1000,
     "role": "baseline"},
    {"task": "image-classification", "dataset": "uoft-cs/cifar10", "hub_dataset": True, "dataset_name": "CIFAR-10",
     "split": "test", "metric": "accuracy", "value": 0.784, "method": "SGD + learned prior",
     "num_train_examples": 1000, "scale": 1e5},
    {"task": "image-classification", "dataset": "uoft-cs/cifar10", "hub_dataset": True, "dataset_name": "CIFAR-10",
     "split": "test", "metric": "nll", "value": 0.61, "method": "SGD + learned prior", "num_train_examples": 1000,
     "scale": 1e5},
    {"task": "image-classification", "dataset": "nelorth/oxford-flowers", "hub_dataset": True, "metric": "nll",
     "value": 1.25, "method": "SGD + learned prior", "source_name": "priorzoo benchmarks",
     "source_url": "https://example.org/b"},
    {"task": "image-classification", "dataset": "my-flowers", "metric": "accuracy", "value": 0.5,
     "method": "SGD + learned prior"},  # a local dataset: no model-index entry (dataset.type must be a Hub id)
    {"dataset": "ImageNet-1k", "split": "held-out 10%", "metric": "accuracy", "value": 0.71, "role": "source",
     "method": "prior mean + source head"},
    {"task": "image-classification", "dataset": "uoft-cs/cifar10", "hub_dataset": True, "metric": "accuracy",
     "value": "n/a", "notes": "diverged"},
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
    # only the prior's own numeric results on Hub datasets: no baseline, no source number, no local data, no "n/a"
    assert sorted(e.metric_value for e in data.eval_results) == [0.61, 0.784, 1.25]
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
    assert by_value[0.784].dataset_type == "uoft-cs/cifar10"
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
    assert "No recommended λ was recorded" in text
    assert text == render_card(cfg)  # deterministic


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ({"library": "timm", "name": "resnet50"}, None),  # which weights? ambiguous: left out
        ({"library": "timm", "name": "resnet50.a1_in1k"}, None),  # a name says nothing about loaded weights
        ({"library": "timm", "name": "resnet50.a1_in1k", "pretrained": True}, "timm/resnet50.a1_in1k"),
        ({"library": "timm", "name": "test_resnet", "pretrained": False}, None),  # trained from scratch
        ({"library": "timm", "name": "r18", "hub_id": "timm/resnet18.a1_in1k", "pretrained": False}, None),
        ({"library": "transformers", "name": "google-bert/bert-base-uncased"}, None),  # from_config has it too
        (
            {"library": "transformers", "name": "google-bert/bert-base-uncased", "pretrained": True},
            "google-bert/bert-base-uncased",
        ),
        ({"library": "transformers", "name": "/usr/lib/models/minilm", "pretrained": True}, None),  # a folder
        ({"library": "transformers", "name": "minilm", "local": True, "pretrained": True}, None),  # its name
        ({"library": "torch", "architecture": "Net", "hub_id": "org/net"}, "org/net"),  # the user's statement
    ],
)
def test_base_model_only_when_it_is_a_hub_id(backbone: dict[str, Any], expected: str | None) -> None:
    cfg = PriorConfig(kind="isotropic", rank=0, parameters=[ParameterSpec("w", (2,))], backbone=backbone)
    assert card_metadata(cfg).get("base_model") == expected
    assert ModelCard(render_card(cfg)).data.base_model == expected


def test_weights_row_says_where_the_weights_came_from() -> None:
    def row(backbone: dict[str, Any]) -> str:
        cfg = PriorConfig(kind="isotropic", rank=0, parameters=[ParameterSpec("w", (2,))], backbone=backbone)
        return next(line for line in render_card(cfg).splitlines() if line.startswith("| pre-trained weights |"))

    assert row({"library": "timm", "name": "resnet18", "pretrained": False}).endswith(
        "random initialisation (`pretrained: false`) |"
    )
    checkpoint = {"library": "timm", "name": "resnet18", "pretrained": True, "checkpoint": "ckpt.pth"}
    assert (
        row(checkpoint) == "| pre-trained weights | pre-trained, from weights that are not a Hub model (`ckpt.pth`) |"
    )
    assert row({"library": "timm", "name": "resnet18"}) == "| pre-trained weights | not recorded |"


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
    assert (
        "| source data | ImageNet-1k ([ILSVRC/imagenet-1k](https://huggingface.co/datasets/ILSVRC/imagenet-1k)) |"
        in body
    )
    assert "| objective | supervised |" in body
    assert (
        "| pre-trained weights | pre-trained, [timm/resnet50.a1_in1k](https://huggingface.co/timm/resnet50.a1_in1k) |"
        in body
    )
    assert "| snapshots | 40 |" in body and "| lr | 0.001 |" in body
    assert "**λ = 100000** was recorded by the prior's author without saying how it" in body
    assert (
        "| image-classification | CIFAR-10 (test) | SGD + learned prior | yes | 1000 | 100000 | accuracy | 0.784 |"
        in body
    )
    assert "| CIFAR-10 (test) | SGD | no (baseline) | 1000 |  | accuracy | 0.732 |" in body  # baselines: body only
    assert "| n/a | diverged |" in body  # non-numeric results still shown in the table
    source = body.split("## Source task", 1)[1]  # the source number is not a transfer result
    assert "| ImageNet-1k (held-out 10%) | prior mean + source head | accuracy | 0.71 |" in source
    assert "0.71 |" not in body.split("## Source task", 1)[0]
    assert "arxiv.org/abs/2205.10279" in body
    assert "`fc.*`" in body


def test_transformers_snippet_matches_the_library_api() -> None:
    cfg = swag_config(
        backbone={
            "library": "transformers",
            "name": "google-bert/bert-base-uncased",
            "model_type": "bert",
            "pretrained": True,
        },
        source={"dataset": "wikitext", "objective": "mlm"},
        results=[],
    )
    text = render_card(cfg, repo_id="org/bert-prior")
    code = "\n".join(code_blocks(text))
    assert 'BACKBONE = "google-bert/bert-base-uncased"' in code
    assert "AutoModelForSequenceClassification.from_pretrained(BACKBONE, num_labels=NUM_LABELS)" in code
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


# ------------------------------------------------------------------------------------------- snippets run
def run_card_snippets(prior: PriorModel, folder: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Render the saved prior's card with its folder as the repo and execute every Python block, in order, in one
    namespace (the later blocks continue the first), offline, in ``workdir``; returns the namespace."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(workdir)
    text = render_card(PriorModel.from_pretrained(folder).config, repo_id=str(folder))
    namespace: dict[str, Any] = {"__name__": "card_snippet"}
    blocks = code_blocks(text)
    assert blocks
    for i, block in enumerate(blocks):
        exec(compile(block, f"<card snippet {i}>", "exec"), namespace)
    return namespace


def mean_prior_of(model: torch.nn.Module, head: str, **config: Any) -> PriorModel:
    mean = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(f"{head}.")}
    return PriorModel.from_tensors(mean, variance=1e-4, exclude=[f"{head}.*"], **config)


def test_timm_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    prior = mean_prior_of(
        source,
        "fc",
        backbone={"library": "timm", "name": "test_resnet.r160_in1k", "pretrained": False},
        learning={"image_size": 32, "recommended_scale_rule": "rule = 1000 (50% of the variances at the floor)"},
        recommended_scale=1e3,
    )
    folder = prior.save_pretrained(tmp_path / "prior")
    text = (folder / "README.md").read_text()
    assert "pretrained=True" not in text and "r160_in1k" not in text  # a random init claims no weights
    ns = run_card_snippets(prior, folder, tmp_path, monkeypatch)
    assert ns["model"].get_classifier().out_features == ns["NUM_CLASSES"] == 10
    assert torch.isfinite(ns["loss"])
    assert len(ns["search"].curve) == 11  # one short run per decade of 1 … 1e10
    assert ns["prior"].scale == ns["search"].best_scale


def _tiny_bert_folder(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from _models import tiny_bert_config

    words = ["a", "great", "dull", "fine", "poor", "film"]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = transformers.BertTokenizerFast(vocab=vocab)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(tiny_bert_config(vocab_size=len(tokenizer))).save_pretrained(folder)
    return folder


def test_transformers_and_peft_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    backbone = _tiny_bert_folder(tmp_path / "tiny-bert")
    source = transformers.BertForMaskedLM.from_pretrained(backbone)
    prior = mean_prior_of(  # a masked-LM prior: `bert.*`, the MLM head `cls.*` left out
        source,
        "cls",
        backbone={
            "library": "transformers",
            "name": str(backbone),  # recorded as the folder's name (no local path is published)
            "local": True,
            "model_type": "bert",
            "pretrained": True,
        },
        source={"dataset": "reviews.csv", "objective": "mlm", "local": True},
    )
    prior.config.record_measured_scale(1e3, measured_on="validation NLL of a test task (N=2)")
    folder = prior.save_pretrained(tmp_path / "prior")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None  # a local folder's name is no Hub model
    assert 'BACKBONE = "tiny-bert"  # the prior was learned on a local folder of this name' in card.text
    ns = run_card_snippets(prior, folder, tmp_path, monkeypatch)  # in tmp_path, where tiny-bert/ is
    assert ns["trainer"].state.global_step > 0
    assert ns["model"].config.num_labels == ns["NUM_LABELS"] == 2
    assert torch.isfinite(ns["loss"])
    assert any("lora_A" in n for n, _ in ns["lora"].named_parameters())
    assert ns["prior"].scale == ns["search"].best_scale


def test_transformers_image_snippets_from_a_random_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
    )
    backbone = tmp_path / "tiny-vit"
    config.save_pretrained(backbone)  # a config only: no weights to load
    torch.manual_seed(0)
    source = transformers.ViTForImageClassification(config)
    prior = mean_prior_of(
        source,
        "classifier",
        backbone={"library": "transformers", "name": str(backbone), "model_type": "vit", "pretrained": False},
    )
    folder = prior.save_pretrained(tmp_path / "prior")
    text = (folder / "README.md").read_text()
    assert "from_config(AutoConfig.from_pretrained(BACKBONE" in text and "Classification.from_pretrained(" not in text
    ns = run_card_snippets(prior, folder, tmp_path, monkeypatch)
    assert ns["trainer"].state.global_step > 0
    assert ns["model"].classifier.out_features == 2


def test_torchvision_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    source = torchvision.models.get_model("resnet18", weights=None, num_classes=3)
    prior = mean_prior_of(
        source,
        "fc",
        backbone={"library": "torchvision", "name": "resnet18", "architecture": "ResNet", "pretrained": False},
        learning={"image_size": 32},
    )
    folder = prior.save_pretrained(tmp_path / "prior")
    text = (folder / "README.md").read_text()
    assert "build_model" not in text and "pretrained=False" in text
    ns = run_card_snippets(prior, folder, tmp_path, monkeypatch)
    assert ns["model"].fc.out_features == 10
    assert torch.isfinite(ns["loss"])


def test_plain_torch_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)

    def net() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    prior = mean_prior_of(net(), "2", backbone={"library": "torch", "architecture": "Sequential"})
    folder = prior.save_pretrained(tmp_path / "prior")
    ns = run_card_snippets(prior, folder, tmp_path, monkeypatch)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    model = net()
    start = model[0].weight.detach().clone()
    assert ns["finetune"](model, loader, 16) is model
    assert not torch.equal(model[0].weight.detach(), start)  # set to μ, then trained
    assert ns["choose_scale"](net, loader, loader, 16) > 0


def test_save_pretrained_writes_a_card_that_parses(tmp_path: Path) -> None:
    prior = PriorModel.from_tensors(
        {"w": torch.zeros(2, 2)},
        variance={"w": torch.ones(2, 2)},
        cov_factor={"w": torch.ones(3, 2, 2)},
        license="MIT",
        results=[{"dataset": "ylecun/mnist", "hub_dataset": True, "metric": "accuracy", "value": 0.5}],
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


# ------------------------------------------------------------------------------------------- on the Hub
def test_pushed_card_of_a_random_init_prior_claims_no_hub_provenance(hub_server, monkeypatch, tmp_path) -> None:
    """learn (random init, local data name) → push to the local Hub server → the card read back from the Hub."""
    timm = pytest.importorskip("timm")
    from priorzoo.learn import SWAGCollector

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet.r160_in1k", pretrained=False, num_classes=3)  # timm names weights anyway
    collector = SWAGCollector(model, rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        collector.collect()
    prior = collector.to_prior(source={"dataset": "my-data", "objective": "supervised"})
    prior.config.results = [
        {"dataset": "org/target", "hub_dataset": True, "metric": "accuracy", "value": 0.8, "method": "prior"},
        {"dataset": "org/target", "hub_dataset": True, "metric": "accuracy", "value": 0.7, "method": "fine-tuning",
         "role": "baseline"},
        {"dataset": "my-data", "metric": "accuracy", "value": 0.9, "method": "prior mean", "role": "source"},
    ]  # fmt: skip
    prior.push_to_hub("me/r160-my-data-swag")
    card = ModelCard.load("me/r160-my-data-swag")  # from the server, as a Hub user reads it
    data = card.data.to_dict()
    assert "datasets" not in data and "base_model" not in data  # a local data name, no loaded weights
    assert data["tags"] == ["priorzoo", "bayesian-prior", "swag", "transfer-learning", "timm"]
    assert [(e.dataset_type, e.metric_value) for e in card.data.eval_results] == [("org/target", 0.8)]
    assert "r160_in1k" not in card.text and "pretrained=True" not in card.text  # nothing reads as pre-trained
    assert 'PriorModel.from_pretrained("me/r160-my-data-swag")' in card.text
    assert "is a rule of thumb, not a measurement" in card.text
