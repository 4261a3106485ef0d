"""Source objectives: cross-entropy, NT-Xent / SimCLR, BERT masking, masked-LM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _models import tiny_bert_config
from torch import nn

from priorzoo.learn import (
    CrossEntropyObjective,
    ImageAugment,
    MaskedLMObjective,
    ProjectionHead,
    SimCLRObjective,
    backbone_features,
    mask_tokens,
    nt_xent_loss,
)


def test_cross_entropy_tuple_and_mapping_batches() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    expected = F.cross_entropy(net(x), y)
    assert torch.allclose(CrossEntropyObjective()(net, (x, y)), expected)
    assert torch.allclose(
        CrossEntropyObjective(input_key="pixel_values")(net, {"pixel_values": x, "labels": y}), expected
    )

    class KwargModel(nn.Module):  # transformers-style: keyword inputs, output with `.logits`
        def __init__(self) -> None:
            super().__init__()
            self.lin = net

        def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.lin(input_ids)}

    assert torch.allclose(CrossEntropyObjective()(KwargModel(), {"input_ids": x, "labels": y}), expected)


def test_cross_entropy_errors_name_the_problem() -> None:
    net = nn.Linear(2, 2)
    with pytest.raises(KeyError, match="no `labels` entry"):
        CrossEntropyObjective()(net, {"x": torch.zeros(1, 2)})
    with pytest.raises(TypeError, match="without `logits`"):
        CrossEntropyObjective()(lambda x: {"hidden": x}, (torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))  # type: ignore[arg-type]


def test_nt_xent_matches_the_formula() -> None:
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(4, 3), torch.randn(4, 3), 0.3
    u = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (u @ u.T / tau).numpy()
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        denom = sum(math.exp(sim[i, k]) for k in range(8) if k != i)
        total += -math.log(math.exp(sim[i, j]) / denom)
    assert float(nt_xent_loss(z1, z2, tau)) == pytest.approx(total / 8, rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(z1, z2, 0.0)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        nt_xent_loss(z1, z2[:3])


def test_simclr_trains_head_and_backbone_but_only_backbone_is_the_model() -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    objective = SimCLRObjective(feature_dim=6, projection_dim=4)
    loss = objective(backbone, (torch.rand(5, 3, 12, 12), torch.zeros(5)))
    loss.backward()
    assert backbone[0].weight.grad is not None
    assert all(p.grad is not None for p in objective.head.parameters())
    assert isinstance(objective.head, ProjectionHead)
    with pytest.raises(ValueError, match="feature_dim"):
        SimCLRObjective(feature_dim=0)
    with pytest.raises(ValueError, match="cannot read the feature dimension"):
        SimCLRObjective.for_model(nn.Linear(2, 2))


def test_image_augment_is_random_reproducible_and_shape_preserving() -> None:
    aug = ImageAugment()
    x = torch.rand(3, 3, 16, 16)
    a = aug(x, generator=torch.Generator().manual_seed(1))
    b = aug(x, generator=torch.Generator().manual_seed(1))
    c = aug(x, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageAugment(crop_scale=(0.0, 1.0))


def test_backbone_features_shapes() -> None:
    assert backbone_features(torch.ones(2, 4, 3, 3)).shape == (2, 4)
    assert backbone_features(torch.ones(2, 7, 4)).shape == (2, 4)
    assert backbone_features({"last_hidden_state": torch.ones(2, 7, 4)}).shape == (2, 4)
    assert backbone_features({"pooler_output": torch.zeros(2, 5), "last_hidden_state": torch.ones(2, 7, 4)}).shape == (
        2,
        5,
    )


def test_mask_tokens_follows_bert_80_10_10() -> None:
    ids = torch.randint(10, 1000, (200, 100), generator=torch.Generator().manual_seed(0))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    masked, labels = mask_tokens(
        ids,
        mask_token_id=3,
        vocab_size=1000,
        probability=0.15,
        special_tokens_mask=special,
        generator=torch.Generator().manual_seed(1),
    )
    chosen = labels != -100
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 99 / 100) < 0.01
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])
    frac_mask = (masked[chosen] == 3).float().mean().item()
    frac_kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.02 and abs(frac_kept - 0.1) < 0.02


def test_mask_tokens_always_asks_for_one_prediction() -> None:
    ids = torch.tensor([[5, 6]])
    _, labels = mask_tokens(
        ids, mask_token_id=0, vocab_size=10, probability=0.01, generator=torch.Generator().manual_seed(0)
    )
    assert (labels != -100).sum() >= 1


def test_masked_lm_objective_on_a_tiny_bert() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_bert_config()
    model = transformers.BertForMaskedLM(cfg)
    objective = MaskedLMObjective(
        mask_token_id=4, vocab_size=100, special_token_ids=(0, 1, 2, 3), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": torch.randint(5, 100, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    loss = objective(model, batch)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(math.log(100), rel=0.2)
    loss.backward()
    with pytest.raises(TypeError, match="input_ids"):
        objective(model, (torch.zeros(1),))  # type: ignore[arg-type]
    only_special = {"input_ids": torch.tensor([[2, 1, 1, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    with pytest.raises(ValueError, match=r"every token of the batch is special or padding.*\[UNK\] only"):
        objective(model, only_special)
