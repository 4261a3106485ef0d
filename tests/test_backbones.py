"""priorzoo.backbones: torchvision / timm / checkpoints, provenance, freezing; the one head rule."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from priorzoo import PriorModel
from priorzoo.backbones import Backbone, freeze_, load_backbone, load_checkpoint_

tv = pytest.importorskip("torchvision")


def test_torchvision_random_init_claims_no_weights_and_has_the_head() -> None:
    b = load_backbone("resnet18", library="torchvision", pretrained=False, num_classes=4)
    assert (b.library, b.pretrained, b.weights) == ("torchvision", False, None)
    assert b.model.fc.out_features == 4
    assert b.describe() == {"library": "torchvision", "name": "resnet18", "architecture": "ResNet", "pretrained": False}


def test_checkpoint_file_loads_the_backbone_and_skips_the_old_head(tmp_path) -> None:
    torch.manual_seed(0)
    source = tv.models.get_model("resnet18", num_classes=10)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)  # a plain tensor state dict: readable with weights_only=True
    b = load_backbone("resnet18", library="torchvision", pretrained=False, checkpoint=path, num_classes=3)
    assert b.pretrained and b.weights == str(path) and sorted(b.skipped) == ["fc.bias", "fc.weight"]
    assert torch.equal(b.model.conv1.weight, source.conv1.weight)
    assert b.model.fc.out_features == 3
    described = b.describe()  # published with a prior: the file's name and sha256, never its local path
    assert described["checkpoint"] == "r18.pth" and "hub_id" not in described and "weights" not in described
    assert described["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(tmp_path) not in json.dumps(described)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a readable state dict"):
        load_checkpoint_(b.model, tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint_(b.model, tmp_path / "missing.pth")
    other = tv.models.get_model("mobilenet_v2", num_classes=3)
    with pytest.raises(ValueError, match=r"does not fit the model|other shapes"):
        load_checkpoint_(other, path)


@pytest.mark.slow
def test_a_torchvision_learned_prior_matches_a_fresh_model_with_a_new_head() -> None:
    from priorzoo.learn import SWAGCollector

    torch.manual_seed(0)
    source = tv.models.get_model("resnet18", num_classes=10)
    collector = SWAGCollector(source, rank=2)
    assert collector.head_names == ["fc.bias", "fc.weight"]
    for _ in range(4):
        source(torch.randn(4, 3, 32, 32))  # moves the BN statistics
        with torch.no_grad():
            source.conv1.weight.add_(0.01 * torch.randn_like(source.conv1.weight))
        collector.collect()
    prior = collector.to_prior()
    fresh = load_backbone("resnet18", library="torchvision", pretrained=False, num_classes=3).model
    match = prior.match(fresh)
    assert match.is_complete and match.no_prior == ["fc.weight", "fc.bias"]
    prior.init_model_(fresh)
    assert torch.equal(fresh.conv1.weight, prior.mean["conv1.weight"])
    assert torch.equal(fresh.bn1.running_mean, prior.buffers["bn1.running_mean"])
    assert torch.isfinite(prior.with_scale().penalty(fresh))


def test_freeze_patterns_and_trainable_layers() -> None:
    model = tv.models.get_model("resnet18", num_classes=3)
    frozen = freeze_(model, trainable_layers=1)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer4.1", "fc.weight", "fc.bias"}
    assert "conv1.weight" in frozen and "fc.weight" not in frozen
    with pytest.raises(ValueError, match=r"`--freeze` 'nothing\*' matches no parameter"):
        freeze_(model, freeze="nothing*")
    with pytest.raises(ValueError, match=r"`--trainable-layers` must be an integer ≥ 0"):
        freeze_(model, trainable_layers=-1)


def test_unknown_library_and_model_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"`library` must be one of auto, timm, transformers, torchvision"):
        load_backbone("resnet18", library="keras")
    with pytest.raises(ValueError, match="cannot create torchvision model 'no_such_net'"):
        load_backbone("no_such_net", library="torchvision", pretrained=False)


def test_backbone_is_a_plain_record() -> None:
    b = Backbone(torch.nn.Linear(2, 2), None, "timm", "resnet18", pretrained=True, weights="timm/resnet18.a1_in1k")
    assert b.describe()["hub_id"] == "timm/resnet18.a1_in1k"


@pytest.mark.slow
def test_learn_torchvision_resnet18_end_to_end(tmp_path) -> None:
    image = pytest.importorskip("PIL.Image")
    from priorzoo.cli import main

    gen = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(32, 32, 3, generator=gen) * 255).to(torch.uint8).numpy()
            image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "prior"
    code = main(
        ["learn", "resnet18", "--library", "torchvision", "--no-pretrained", "--data", str(tmp_path / "imgs"),
         "--epochs", "2", "--batch-size", "4", "--collect-every", "1", "--rank", "3", "--image-size", "32",
         "--output", str(out), "--no-progress", "--trainable-layers", "2"]
    )  # fmt: skip
    assert code == 0
    prior = PriorModel.from_pretrained(out)
    assert prior.config.backbone == {
        "library": "torchvision",
        "name": "resnet18",
        "architecture": "ResNet",
        "pretrained": False,
    }
    assert prior.names and all(n.startswith("layer4.") for n in prior.names)  # frozen layers have no prior
    assert "fc.weight" not in prior.names and prior.buffers
    fresh = load_backbone("resnet18", library="torchvision", pretrained=False, num_classes=5).model
    freeze_(fresh, trainable_layers=2)
    assert prior.match(fresh).is_complete


def test_a_new_timm_efficientnet_family_head_is_zeroed_by_init_head() -> None:
    """The cause of "fine-tuning a pre-trained mobilenetv2 sits at chance": timm draws the new classifier
    uniformly in ±1/√classes, far too large over 1280 pre-trained features; finetune zeroes it."""
    import math

    timm = pytest.importorskip("timm")
    from priorzoo.backbones import init_head_

    model = timm.create_model("mobilenetv2_100", num_classes=10, pretrained=False)
    bound = float(model.classifier.weight.abs().max())
    assert 0.9 / math.sqrt(10) < bound <= 1 / math.sqrt(10) and model.classifier.in_features == 1280
    assert init_head_(model) == ["classifier.weight", "classifier.bias"]
    assert float(model.classifier.weight.abs().sum()) == 0.0
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert torch.allclose(loss, torch.tensor(math.log(10)))  # every class starts equal: loss log C


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics_while_training() -> None:
    import copy

    from priorzoo.backbones import is_frozen_batchnorm
    from priorzoo.finetune import refresh_batchnorm_

    net = _bn_net()
    net[1].running_mean.fill_(0.3)  # "pre-trained" statistics
    frozen = freeze_(net, freeze=["0.*", "1.*"])
    assert frozen == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert is_frozen_batchnorm(net[1]) and not is_frozen_batchnorm(net[4])
    net = copy.deepcopy(net)  # the hook travels with a copy (the Trainer and the λ search copy models)
    before = {k: v.clone() for k, v in net[1].state_dict().items()}
    trained_before = net[4].running_mean.clone()
    seen = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        net.train()  # what the Trainer does before every step
        loss = torch.nn.functional.cross_entropy(net(torch.randn(8, 3, 8, 8) * 3 + 1), torch.randint(0, 2, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert seen == [False, False, False]  # eval mode during every training step
    for k, v in net[1].state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics (and the counter) unchanged
    assert not torch.equal(net[4].running_mean, trained_before)  # the trained part's statistics move
    refresh_batchnorm_(net, [(torch.randn(8, 3, 8, 8), torch.zeros(8).long())])
    assert torch.equal(net[1].running_mean, before["running_mean"])  # a refresh leaves the frozen layer alone


def test_trainable_layers_freezes_the_batchnorm_of_the_frozen_blocks() -> None:
    model = tv.models.resnet18(num_classes=3)
    freeze_(model, trainable_layers=1)
    frozen = {n for n, m in model.named_modules() if getattr(m, "_priorzoo_frozen_batchnorm", False)}
    assert "bn1" in frozen and "layer4.0.bn1" in frozen and "layer4.1.bn1" not in frozen
