"""Backbone matching onto timm and transformers models: prefixes, new heads, patterns, failures."""

from __future__ import annotations

import _models
import pytest
import torch

from priorzoo import PriorMatchError
from priorzoo.binding.matching import compile_patterns, head_parameter_names, match_parameters, select_parameters

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def tiny_bert_config(num_labels=3):
    return _models.tiny_bert_config(num_labels, hidden_size=16, intermediate_size=24, vocab_size=50)


@pytest.fixture(scope="module")
def resnet_source():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def test_timm_backbone_prior_onto_new_head(resnet_source):
    prior = _models.mean_prior(select_parameters(resnet_source, exclude="fc.*").items(), exclude=["fc.*"])
    target = timm.create_model("resnet18", pretrained=False, num_classes=3)
    m = prior.match(target)
    assert m.is_complete
    assert len(m.matched) == len(prior.names)
    assert m.no_prior == ["fc.weight", "fc.bias"]
    prior.bind(target).penalty().backward()
    assert target.fc.weight.grad is None and target.conv1.weight.grad is not None


def test_timm_full_prior_head_with_other_classes_is_excluded(resnet_source):
    prior = _models.mean_prior(resnet_source.named_parameters())  # includes the 10-class fc
    target = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert head_parameter_names(target) == {"fc.weight", "fc.bias"}
    m = prior.match(target)
    assert m.excluded == ["fc.weight", "fc.bias"]
    assert m.is_complete
    with pytest.raises(PriorMatchError, match=r"`fc\.weight` prior \(10, 512\) vs model `fc\.weight` \(3, 512\)"):
        prior.match(target, exclude_head=False).check()


def test_transformers_base_model_prior_onto_task_model():
    torch.manual_seed(0)
    base = transformers.BertModel(tiny_bert_config(), add_pooling_layer=True)
    prior = _models.mean_prior(base.named_parameters())
    task = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=5))
    m = prior.match(task)
    assert m.model_prefix == "bert." and m.prior_prefix == ""
    assert m.is_complete and len(m.matched) == len(prior.names)
    assert m.no_prior == ["classifier.weight", "classifier.bias"]
    assert head_parameter_names(task) == {"classifier.weight", "classifier.bias"}


def test_transformers_task_prior_onto_base_model_and_other_head():
    torch.manual_seed(0)
    src = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2))
    prior = _models.mean_prior(src.named_parameters())
    m = prior.match(transformers.BertModel(tiny_bert_config()))
    assert m.prior_prefix == "bert." and m.model_prefix == ""
    assert m.missing == ["classifier.weight", "classifier.bias"]
    with pytest.raises(PriorMatchError, match="missing in the model"):
        m.check()
    m.check(allow_partial=True)
    other = prior.match(transformers.BertForSequenceClassification(tiny_bert_config(num_labels=7)))
    assert other.excluded == ["classifier.weight", "classifier.bias"] and other.is_complete


def test_ddp_style_module_prefix(resnet_source):
    prior = _models.mean_prior(select_parameters(resnet_source, exclude="fc.*").items())
    wrapper = torch.nn.Module()
    wrapper.module = timm.create_model("resnet18", pretrained=False, num_classes=3)
    m = prior.match(wrapper)
    assert m.model_prefix == "module." and m.is_complete
    assert m.no_prior == ["module.fc.weight", "module.fc.bias"]


def test_user_include_exclude_patterns(resnet_source):
    prior = _models.mean_prior(select_parameters(resnet_source, exclude="fc.*").items())
    target = timm.create_model("resnet18", pretrained=False, num_classes=3)
    m = prior.match(target, include="layer4.*")
    assert all(n.startswith("layer4.") for n in m.matched)
    m2 = prior.match(target, exclude=["*.bias", "bn*"])
    assert not any(n.endswith(".bias") for n in m2.matched)
    m3 = prior.match(target, exclude=lambda n: "downsample" in n)
    assert not any("downsample" in n for n in m3.matched)


def test_prior_for_another_architecture(resnet_source):
    prior = _models.mean_prior(select_parameters(resnet_source, exclude="fc.*").items())
    r34 = timm.create_model("resnet34", pretrained=False, num_classes=3)
    with pytest.raises(PriorMatchError, match=r"outside the head have no prior: `layer1\.2\.conv1\.weight`"):
        prior.bind(r34)
    assert prior.match(r34).uncovered[0] == "layer1.2.conv1.weight"
    prior.bind(r34, allow_partial=True)  # the user may still want it for the shared blocks
    gray = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=1)  # 1-channel stem
    with pytest.raises(PriorMatchError, match="another shape"):
        prior.bind(gray)
    bert = transformers.BertModel(tiny_bert_config())
    with pytest.raises(PriorMatchError, match="another architecture"):
        prior.bind(bert)


def test_summary_is_readable(resnet_source):
    prior = _models.mean_prior(select_parameters(resnet_source, exclude="fc.*").items())
    text = prior.match(timm.create_model("resnet18", pretrained=False, num_classes=3)).summary()
    assert "matched 60 parameters" in text and "`fc.weight`" in text


def test_compile_patterns_rejects_non_strings():
    with pytest.raises(TypeError, match="glob strings"):
        compile_patterns(["fc.*", 3])


def test_match_parameters_directly():
    lin = torch.nn.Linear(2, 3)
    m = match_parameters({"weight": (3, 2), "bias": (3,)}, lin, exclude="bias")
    assert m.matched == {"weight": "weight"} and m.excluded == ["bias"]


def test_pooler_missing_from_an_mlm_prior_counts_as_new_head():
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(tiny_bert_config())
    prior = _models.mean_prior(select_parameters(mlm, exclude="cls.*").items(), exclude=["cls.*"])
    task = transformers.BertForSequenceClassification(tiny_bert_config(num_labels=4))
    m = prior.match(task)
    assert "bert.pooler.dense.weight" in m.no_prior
    assert m.uncovered == []
    m.check()


def test_frozen_parameters_without_prior_are_not_uncovered(resnet_source):
    prior = _models.mean_prior(select_parameters(resnet_source, include="layer4.*").items())
    target = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(PriorMatchError, match="outside the head have no prior"):
        prior.bind(target)
    for name, p in target.named_parameters():
        p.requires_grad_(name.startswith(("layer4.", "fc.")))
    assert prior.match(target).uncovered == []
    prior.bind(target)


# ---------------------------------------------------------------------- the one head rule, plain models
class _PlainNet(torch.nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_plain_model_with_a_classifier_linear_has_that_head() -> None:
    assert head_parameter_names(_PlainNet()) == {"classifier.weight", "classifier.bias"}
    ddp_like = torch.nn.Module()
    ddp_like.module = _PlainNet()
    assert head_parameter_names(ddp_like) == {"module.classifier.weight", "module.classifier.bias"}


def test_torchvision_heads_are_detected() -> None:
    tv = pytest.importorskip("torchvision")
    assert head_parameter_names(tv.models.get_model("resnet18", num_classes=5)) == {"fc.weight", "fc.bias"}
    assert head_parameter_names(tv.models.get_model("mobilenet_v2", num_classes=5)) == {
        "classifier.1.weight",
        "classifier.1.bias",
    }


def test_an_output_layer_not_named_like_a_head_is_not_assumed() -> None:
    from priorzoo.binding.matching import output_layer

    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert output_layer(seq) == "2" and head_parameter_names(seq) == set()
    ends_in_norm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    assert output_layer(ends_in_norm) is None


def test_learned_priors_leave_the_plain_head_out_and_warn_about_an_unnamed_output_layer() -> None:
    import warnings

    from priorzoo.learn import SWAGCollector, isotropic_prior

    net = _PlainNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the detected head: nothing to warn about
        assert SWAGCollector(net, rank=2).names == ["features.0.weight", "features.0.bias"]
        assert isotropic_prior(net).names == ["features.0.weight", "features.0.bias"]
        assert isotropic_prior(net, 0.1).names == ["features.0.weight", "features.0.bias"]

    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    for build in (lambda **kw: SWAGCollector(seq, rank=2, **kw), lambda **kw: isotropic_prior(seq, **kw)):
        with pytest.warns(UserWarning, match=r"include `2.weight`, `2.bias`, which look like the model's output"):
            build()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert build(head="2.*").names == ["0.weight", "0.bias"]  # explicit head
            assert build(head=[]).names == ["0.weight", "0.bias", "2.weight", "2.bias"]  # kept on purpose


@pytest.mark.parametrize("fits", ["body", "head"])
def test_of_two_prefixes_of_one_length_that_match_the_names_the_one_whose_shapes_fit_wins(fits) -> None:
    """Prior names `weight`/`bias` fit under `body.` and `head.`, with the prior's shapes under one of them: the
    rewrite is that one (it followed the order of a set, PYTHONHASHSEED, and the bind then failed half the time)."""
    model = torch.nn.Module()
    model.body = torch.nn.Linear(4, 8)
    model.head = torch.nn.Linear(8, 2)
    shapes = {"weight": (8, 4), "bias": (8,)} if fits == "body" else {"weight": (2, 8), "bias": (2,)}
    result = match_parameters(shapes, model, exclude_head=False)
    assert result.model_prefix == f"{fits}." and result.matched == {"weight": f"{fits}.weight", "bias": f"{fits}.bias"}
    assert not result.shape_mismatch
