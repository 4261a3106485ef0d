"""A prior over W through PEFT adapters: matching through the wrappers, penalty and gradient against the merged
model (merge_and_unload of a copy with the same frozen set), supported and refused adapter methods, init_model_."""

from __future__ import annotations

import copy

import pytest
import torch
from _models import bert_prior, random_prior, timm_prior, tiny_bert_config

from priorzoo import PriorMatchError, PriorModel
from priorzoo.binding.peft import UnsupportedAdapterError, is_peft_model, lora_model, peft_view

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from peft import (  # noqa: E402
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)

REL = 1e-6


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_bert_config(3, hidden_size=16, intermediate_size=24, vocab_size=50, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(cfg)


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=3, img_size=32)


def vit_prior(model, **kw) -> PriorModel:
    return timm_prior(model, head="head", **kw)


def perturb_adapters(model, seed: int = 3) -> None:
    """Non-zero lora_B (and every other trainable tensor moved), so ΔW ≠ 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def merged_copy(peft_model, prior_names_in_model: list[str]):
    """merge_and_unload() of a copy, with the same frozen set: only the adapted weights (and the head) train."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    view = peft_view(peft_model)
    trainable = set(view.adapted) | {
        p for p, r in view.names.items() if dict(peft_model.named_parameters())[r].requires_grad
    }
    for n, p in merged.named_parameters():
        p.requires_grad_(n in trainable)
    return merged


def joint_penalty(prior, model, prefix: str = ""):
    """The oracle: the prior's joint ½ rᵀΣ⁻¹r at the merged model's weights, straight from the Gaussian."""
    params = dict(model.named_parameters())
    return prior.gaussian().half_quad([params[prefix + n] for n in prior.names])


CASES = {
    "bert-lora": (
        tiny_bert,
        bert_prior,
        "bert.",
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    ),
    "vit-lora": (
        tiny_vit,
        vit_prior,
        "",
        LoraConfig(r=4, lora_alpha=16, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
    ),
    "vit-loha": (tiny_vit, vit_prior, "", LoHaConfig(r=2, target_modules=["qkv"], modules_to_save=["head"])),
    "vit-lokr": (tiny_vit, vit_prior, "", LoKrConfig(r=2, target_modules=["qkv"], modules_to_save=["head"])),
    "vit-adalora": (tiny_vit, vit_prior, "", AdaLoraConfig(r=2, target_modules=["qkv"], total_step=10)),
    "vit-vera": (tiny_vit, vit_prior, "", VeraConfig(r=4, target_modules=["fc1"], modules_to_save=["head"])),
}


def _build(case: str):
    make_model, make_prior, prefix, config = CASES[case]
    base = make_model()
    prior = make_prior(base)
    model = get_peft_model(base, copy.deepcopy(config))
    perturb_adapters(model)
    return model, prior, prefix


@pytest.mark.parametrize("case", sorted(CASES))
def test_penalty_equals_penalty_of_the_merged_model(case):
    model, prior, prefix = _build(case)
    merged = merged_copy(model, prior.names)
    value = prior.penalty(model)
    assert float(value.detach()) == pytest.approx(float(prior.penalty(merged).detach()), rel=REL)
    assert float(value) == pytest.approx(float(joint_penalty(prior, merged, prefix)), rel=REL)
    assert float(prior.log_prob(model)) == pytest.approx(float(prior.log_prob(merged)), rel=1e-6)


@pytest.mark.parametrize("case", ["bert-lora", "vit-lora"])
def test_adapter_gradients_are_the_chain_rule_of_the_merged_gradient(case):
    model, prior, prefix = _build(case)
    merged = merged_copy(model, prior.names)
    joint_penalty(prior, merged, prefix).backward()
    prior.penalty(model).backward()
    grads = dict(merged.named_parameters())
    view = peft_view(model)
    assert view.adapted
    for plain, layer in view.adapted.items():
        g = grads[plain].grad  # ∂penalty/∂W of the merged model
        a = layer.module.lora_A["default"].weight
        b = layer.module.lora_B["default"].weight
        s = layer.module.scaling["default"]
        want_b, want_a = s * g @ a.T, s * b.T @ g
        assert (b.grad - want_b).abs().max() <= 1e-5 * want_b.abs().max()
        assert (a.grad - want_a).abs().max() <= 1e-5 * want_a.abs().max()
        assert layer.weight.grad is None  # W₀ stays frozen
    # the no-autograd path (PriorRegularizer.add_to_grad_, the callback) gives the same gradients
    bound = prior.bind(model)
    value, by_param = bound.value_and_grad()
    assert float(value) == pytest.approx(float(bound.penalty()), rel=REL)
    for p, g in zip(bound.parameters, by_param):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7)


def test_match_reports_adapted_frozen_absent_blocks_and_adapter_tensors():
    base = tiny_bert()
    prior = bert_prior(base)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    m = prior.match(model)
    assert m.model_prefix == "base_model.model.bert."
    layer0 = "encoder.layer.0.attention.self.query.weight"
    assert sorted(m.adapted) == [layer0, layer0.replace("layer.0", "layer.1")]
    assert m.matched[layer0] == f"base_model.model.bert.{layer0.removesuffix('.weight')}.base_layer.weight"
    assert m.adapted[layer0] == [
        f"base_model.model.bert.encoder.layer.0.attention.self.query.lora_{x}.default.weight" for x in "AB"
    ]
    assert len(m.adapters) == 4 and all(".lora_" in n for n in m.adapters)
    # the bias of the adapted layer keeps its plain name and is frozen, as is everything not adapted
    assert "encoder.layer.0.attention.self.query.bias" in m.frozen
    assert set(m.frozen) == set(m.matched) - set(m.adapted)
    assert m.missing == m.absent == [] and m.uncovered == []
    # the SEQ_CLS classifier (modules_to_save) stays the head: no prior, not uncovered
    assert m.no_prior == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    text = m.summary()
    assert "adapted (LoRA" in text and "frozen" in text
    m.check()


def test_match_through_ddp_style_wrapper_and_absent_blocks():
    base = tiny_vit()
    prior = random_prior(
        {n: p for n, p in base.named_parameters() if not n.startswith("head.")} | {"extra.weight": torch.zeros(2, 2)},
        exclude=["head.*"],
    )
    wrapper = torch.nn.Module()
    wrapper.module = get_peft_model(base, LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]))
    m = prior.match(wrapper)
    assert m.model_prefix == "module.base_model.model."
    assert m.absent == ["extra.weight"]
    assert len(m.adapted) == 6  # test_vit has 6 blocks
    with pytest.raises(PriorMatchError, match="missing in the model"):
        m.check()
    m.check(allow_partial=True)


def test_adapters_on_layers_outside_the_prior_are_uncovered():
    base = tiny_bert()
    prior = bert_prior(base)
    prior = PriorModel.from_tensors(
        {n: t for n, t in prior.mean.items() if "query" not in n},
        {n: t for n, t in prior.variance.items() if "query" not in n},
    )
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    m = prior.match(model)
    assert len(m.adapted) == 2  # the value layers
    assert len(m.uncovered) == 4 and all("query.lora_" in n for n in m.uncovered)
    with pytest.raises(PriorMatchError, match="outside the head have no prior"):
        prior.bind(model)


def test_a_prior_that_covers_no_adapted_layer_is_refused():
    base = tiny_bert()
    prior = bert_prior(base)
    keep = [n for n in prior.names if n.startswith("embeddings.")]
    prior = PriorModel.from_tensors({n: prior.mean[n] for n in keep}, {n: prior.variance[n] for n in keep})
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    with pytest.raises(PriorMatchError, match="adapt no layer the prior covers"):
        prior.bind(model, allow_partial=True)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LoraConfig(r=2, target_modules=["qkv"], use_dora=True), "is DoRA: it rescales"),
        (IA3Config(target_modules=["qkv"], feedforward_modules=[]), "the `ia3` method has no additive"),
        (OFTConfig(r=2, oft_block_size=0, target_modules=["qkv"]), "the `oft` method has no additive"),
    ],
)
def test_unsupported_adapter_methods_are_refused_by_name(config, message):
    base = tiny_vit()
    prior = vit_prior(base)
    model = get_peft_model(base, config)
    for call in (prior.match, prior.penalty, prior.bind):
        with pytest.raises(UnsupportedAdapterError, match=message) as err:
            call(model)
        assert "`base_model.model.blocks.0.attn.qkv`" in str(err.value)
        assert "Supported: LoRA" in str(err.value)


def test_prompt_learning_is_refused():
    base = tiny_bert()
    prior = bert_prior(base)
    config = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2)
    model = get_peft_model(base, config)
    with pytest.raises(UnsupportedAdapterError, match="PROMPT_TUNING is prompt learning"):
        prior.bind(model)


def test_lora_bias_is_refused():
    base = tiny_vit()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["qkv"], lora_bias=True))
    with pytest.raises(UnsupportedAdapterError, match="lora_bias=True"):
        vit_prior(tiny_vit()).match(model)


def test_merged_adapters_count_once_and_inactive_adapters_not_at_all():
    model, prior, _ = _build("vit-lora")
    merged = merged_copy(model, prior.names)
    expected = float(prior.penalty(merged))
    model.merge_adapter()  # ΔW now inside W₀: not added a second time
    assert float(prior.penalty(model)) == pytest.approx(expected, rel=REL)
    model.unmerge_adapter()
    assert float(prior.penalty(model)) == pytest.approx(expected, rel=REL)
    without = copy.deepcopy(model).unload()  # W₀ alone, adapters dropped
    with model.disable_adapter():  # adapters off: the effective weight is W₀
        assert float(prior.penalty(model)) == pytest.approx(float(joint_penalty(prior, without)), rel=REL)
    assert float(prior.penalty(model)) == pytest.approx(expected, rel=REL)


def test_init_model_sets_base_weights_and_leaves_adapters():
    base = tiny_bert()
    prior = bert_prior(base)
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    params = dict(model.named_parameters())
    key = "encoder.layer.0.attention.self.key.weight"
    before_key = params[f"base_model.model.bert.{key}"].detach().clone()
    m = prior.init_model_(model, adapted_only=True)
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(params[m.matched[q]], prior.mean[q])
    assert torch.equal(params[f"base_model.model.bert.{key}"], before_key)  # not adapted: untouched
    prior.init_model_(model)  # the whole base model
    assert torch.equal(params[f"base_model.model.bert.{key}"], prior.mean[key])
    assert all(torch.equal(adapters[n], p) for n, p in model.named_parameters() if "lora_" in n)
    # LoRA's B = 0 at init: the effective weights are the prior mean, the penalty is zero
    assert float(prior.penalty(model)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="is for a PEFT model"):
        prior.init_model_(tiny_bert(), adapted_only=True)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        prior.init_model_(model)


def test_the_binding_follows_adapter_changes_and_frozen_weight_edits():
    model, prior, _ = _build("bert-lora")
    bound = prior.bind(model)
    first = float(bound.penalty())
    perturb_adapters(model, seed=9)
    assert bound.is_current()  # adapters are read at every step
    assert float(bound.penalty()) != first
    with torch.no_grad():
        dict(model.named_parameters())["base_model.model.bert.embeddings.word_embeddings.weight"].add_(1.0)
    assert not bound.is_current()  # a frozen block's constant terms must be recomputed
    merged = merged_copy(model, prior.names)
    assert float(prior.penalty(model)) == pytest.approx(float(prior.penalty(merged)), rel=REL)


def test_per_step_gaussian_covers_only_the_adapted_weights():
    model, prior, _ = _build("bert-lora")
    bound = prior.bind(model)
    assert bound.gaussian.numel == 4 * 16 * 16  # 2 layers × (query, value) of 16×16
    assert bound.frozen_names and all("query.weight" not in n for n in bound.frozen_names)


def test_is_peft_model_and_lora_model():
    assert not is_peft_model(tiny_vit())
    assert peft_view(tiny_vit()) is None
    model = lora_model(tiny_bert(), r=2, target_modules="query", task_type="SEQ_CLS")
    assert is_peft_model(model)
    assert {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A",
        "lora_B",
        "modules_to_save",
    }
    with pytest.raises(ValueError, match="name no module of the model"):
        lora_model(tiny_bert(), r=2, target_modules=["nonesuch"])
    with pytest.raises(ValueError, match="positive integer"):
        lora_model(tiny_bert(), r=0, target_modules=["query"])


def test_downstream_swag_over_a_lora_run_samples_the_adapters():
    """SWAG over the trainable tensors of a LoRA run (adapters + head) and BMA over its samples: the posterior
    is named like the PEFT model's own tensors and is matched on them."""
    from priorzoo.finetune.bayes import DownstreamSWAG, sample_into_

    model = get_peft_model(tiny_vit(), LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["head"]))
    swag = DownstreamSWAG(model, rank=2)
    for _ in range(4):
        perturb_adapters(model, seed=_)
        swag.collect()
    posterior = swag.posterior()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert posterior.names == trainable  # lora_A/lora_B of every block and the head's trained copy
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    written = sample_into_(model, posterior, torch.Generator().manual_seed(0))
    assert sorted(written) == sorted(trainable)
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before[n]) for n in trainable)
    assert all(torch.equal(after[n], before[n]) for n in before if n not in trainable)  # W₀ untouched


def test_l2sp_on_a_lora_model_is_the_squared_norm_of_delta_w():
    from priorzoo.learn import isotropic_prior

    base = tiny_bert()
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    prior = isotropic_prior(model, 0.5)
    assert sorted(prior.names) == sorted(peft_view(model).adapted)  # the adapted layers, no head, no frozen
    assert float(prior.penalty(model)) == 0.0  # B = 0: ΔW = 0
    perturb_adapters(model)
    view = peft_view(model)
    want = sum(float((layer.effective_weight() - layer.weight).pow(2).sum()) for layer in view.adapted.values()) / (
        2 * 0.5
    )
    assert float(prior.penalty(model).detach()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="no trainable adapted layer"):
        isotropic_prior(model, 0.5, include="embeddings.*")


def test_a_lora_step_is_host_sync_free_and_its_op_count_does_not_grow_with_the_frozen_blocks():
    """The per-step work is the adapted blocks': a prior over the whole backbone (the rest frozen, read once at
    bind) launches exactly the ops of a prior over the adapted layers alone, and never waits for the host."""
    from opcount import OpCounter

    from priorzoo.finetune import PriorRegularizer

    model, whole, _ = _build("bert-lora")
    adapted = [n.removeprefix("bert.") for n in peft_view(model).adapted]
    only = PriorModel.from_tensors(
        {n: whole.mean[n] for n in adapted},
        {n: whole.variance[n] for n in adapted},
        {n: whole.cov_factor[n] for n in adapted},
    )
    counts = {}
    for name, prior in (("whole", whole), ("adapted", only)):
        reg = PriorRegularizer(prior, model, num_train_examples=10, overlap=False)
        reg.add_to_grad_()  # warm-up (lazy state)
        with OpCounter() as grad_path:
            reg.add_to_grad_()
        with OpCounter() as loss_path:
            reg().backward()
        assert grad_path.syncs == [] and loss_path.syncs == [], name
        counts[name] = (len(grad_path.ops), len(loss_path.ops))
    assert counts["whole"] == counts["adapted"]
