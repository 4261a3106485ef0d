"""`priorzoo finetune` with its defaults on a small *real* pre-trained network: a batch-norm CNN (timm
`test_resnet`) trained here on real handwritten digits 0–4 (scikit-learn's UCI digits), fine-tuned on digits 5–9
with 10 images per class. The defaults must reach, within 3 points, the test accuracy of a plain Python loop on
the same model and data (the best of three learning rates, chosen on the test set: a generous bar); a diverging
learning rate must end with a non-ok status and a non-zero exit."""

from __future__ import annotations

import json

import pytest
import torch

from priorzoo.cli import main

pytest.importorskip("timm")
pytest.importorskip("sklearn")
pytestmark = pytest.mark.filterwarnings("ignore")


def _save(root, images, labels):
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"digit{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).round().astype("uint8"), mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Source (digits 0-4, all) and target (digits 5-9: 10 per class to train, the rest to test) image folders and
    a checkpoint of test_resnet trained on the source with a plain loop."""
    import numpy as np
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from priorzoo.backbones import load_backbone
    from priorzoo.data.user import Columns, image_input, load_data, make_collate

    root = tmp_path_factory.mktemp("digits")
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 8, 8)
    rng = np.random.default_rng(0)
    src = y < 5
    _save(root / "source", x[src], y[src])
    train_idx, test_idx = [], []
    for c in range(5, 10):
        idx = rng.permutation(np.flatnonzero(y == c))
        train_idx += idx[:10].tolist()
        test_idx += idx[10:].tolist()
    _save(root / "train", x[train_idx], y[train_idx])
    _save(root / "test", x[test_idx], y[test_idx])

    torch.manual_seed(0)
    net = load_backbone("test_resnet", library="timm", pretrained=False, num_classes=5).model
    ds = load_data(root / "source")
    collate = make_collate(Columns(ds), image=image_input(net, size=16))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, collate_fn=collate)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    for _ in range(4):
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(net(batch["pixel_values"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_file(net.state_dict(), str(root / "source.safetensors"))
    return root


def _plain_loop(root, lr: float) -> float:
    """Fine-tune the same checkpoint (new zeroed head) with SGD + momentum at a constant lr for 10 epochs, batch
    16, last iterate; return the test accuracy."""
    from priorzoo.backbones import init_head_, load_backbone
    from priorzoo.data.user import Columns, image_input, load_data, make_collate

    torch.manual_seed(0)
    net = load_backbone(
        "test_resnet", library="timm", pretrained=False, checkpoint=root / "source.safetensors", num_classes=5
    ).model
    init_head_(net)
    train, test = load_data(root / "train"), load_data(root / "test")
    collate = make_collate(Columns(train, others=[test]), image=image_input(net, size=16))
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=collate)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for _ in range(10):
        net.train()
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(net(batch["pixel_values"]), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    right = 0
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(test, batch_size=64, collate_fn=collate):
            right += int((net(batch["pixel_values"]).argmax(-1) == batch["labels"]).sum())
    return right / len(test)


def _cli(root, out, *extra: str) -> int:
    return main(["finetune", "test_resnet", "--library", "timm", "--no-pretrained", "--checkpoint",
                 str(root / "source.safetensors"), "--no-prior", "--data", str(root / "train"), "--test-data",
                 str(root / "test"), "--image-size", "16", "--output-dir", str(out), "--quiet", *extra])  # fmt: skip


def test_the_defaults_match_a_plain_loop_on_a_real_pretrained_cnn(digits, tmp_path):
    plain = max(_plain_loop(digits, lr) for lr in (1e-3, 1e-2, 1e-1))
    assert plain > 0.5  # the pre-trained features transfer: far above chance (0.2)
    assert _cli(digits, tmp_path / "run") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["start"]["backbone_weights"].endswith("source.safetensors")
    assert metrics["metrics"]["test"]["accuracy"] >= plain - 0.03, (metrics["metrics"]["test"], plain)


def test_a_diverging_learning_rate_ends_non_ok_with_a_non_zero_exit(digits, tmp_path, capsys):
    assert _cli(digits, tmp_path / "run", "--lr", "1e5", "--epochs", "3") == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] in ("diverged", "chance") and metrics["reason"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"priorzoo finetune: error: status {metrics['status']}: ")
