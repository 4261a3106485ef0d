r"""PEFT adapters (LoRA and its kin): the effective weights a prior over W sees through a PEFT model.

A prior learned on a backbone is a density over its weights W. A PEFT model keeps every pre-trained weight
W₀ frozen and trains small adapter tensors; an adapted layer computes with its *effective weight*

.. math:: W = W_0 + \Delta W, \qquad \Delta W = s\,B A \ \text{for LoRA}\ (s = \alpha / r),

``lora_A`` = A [r, in], ``lora_B`` = B [out, r]. priorzoo evaluates the prior at the effective weights
(Chen & Garner 2024 and EWC-LoRA put source-task posteriors on W₀ + ΔW in the same way) and lets autograd
carry the prior's gradient G = ∂penalty/∂W into the adapters:

.. math:: \frac{\partial}{\partial B} = s\,G A^\top, \qquad \frac{\partial}{\partial A} = s\,B^\top G.

ΔW is always PEFT's own ``layer.get_delta_weight(adapter)`` (differentiable), never a hand-written BA, so
the scaling, ``fan_in_fan_out`` (GPT-2's Conv1D), convolution and embedding layouts are PEFT's. Forming
ΔW costs one weight-sized tensor per adapted layer and step, the size of the block the prior reads anyway.

Supported adapter types (tested against ``merge_and_unload``): LoRA on ``Linear``, ``Embedding`` and
``Conv1d/2d/3d`` layers (also GPT-2's ``Conv1D``), LoHa, LoKr, AdaLoRA and VeRA — every method whose merge is
``W₀ += get_delta_weight(adapter)``. Refused, with the reason: LoRA *variants* (DoRA rescales W₀ + ΔW by a
learned magnitude, aLoRA/QALoRA/… change the merge), ``lora_bias=True`` (a bias delta outside
``get_delta_weight``), quantised base layers (bitsandbytes/HQQ: W₀ is not a float tensor), and every other
tuner (IA³, OFT, BOFT, HRA, … are multiplicative or have no additive ΔW). Prompt-learning methods adapt no
weight: the prior then covers only frozen weights and there is nothing for it to act on.

How the rest of the model enters (the frozen rule, the same for PEFT and plain models) is explained in
:mod:`priorzoo.binding.conditional`: frozen weights are held at their values. ``modules_to_save`` copies (the
``classifier`` of a SEQ_CLS task) are seen under their plain names, so the head stays the head.

peft is optional: ``pip install "priorzoo[peft]"``. Only :func:`lora_model` imports it; looking at a model
never does (a model that holds no ``peft`` module is simply not a PEFT model).

Example:
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from priorzoo.binding.peft import peft_view
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> view = peft_view(get_peft_model(net, LoraConfig(r=2, target_modules=["0"])))
    >>> sorted(view.adapted), view.prefix
    (['0.weight'], 'base_model.model.')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from priorzoo.errors import PriorMatchError

__all__ = [
    "AdaptedLayer",
    "PeftView",
    "UnsupportedAdapterError",
    "check_unmerged",
    "effective_weights",
    "is_peft_model",
    "lora_model",
    "peft_state",
    "peft_view",
]

_INSTALL = 'pip install "priorzoo[peft]"'
# tuner layer classes (module, class-name prefix) whose merge is `W0 += get_delta_weight(adapter)`
_ADDITIVE = {
    "peft.tuners.lora": "LoRA",
    "peft.tuners.adalora": "AdaLoRA",
    "peft.tuners.loha": "LoHa",
    "peft.tuners.lokr": "LoKr",
    "peft.tuners.vera": "VeRA",
}
_BASE_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class UnsupportedAdapterError(PriorMatchError):
    """A PEFT adapter whose effective weight priorzoo cannot compute (DoRA, IA³, OFT, quantised layers, …)."""


def _import_peft():
    try:
        import peft
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"priorzoo's PEFT support needs peft: {_INSTALL}") from err
    return peft


def _is_peft_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("peft.")


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds PEFT modules (a ``PeftModel``, or a model with injected adapter layers).

    Never imports peft: a model without any module from the ``peft`` package is not a PEFT model.

    Example:
        >>> is_peft_model(torch.nn.Linear(2, 2))
        False
    """
    return any(_is_peft_module(m) for m in model.modules())


@dataclass
class AdaptedLayer:
    r"""One adapted layer: its frozen base weight W₀, its active adapters and their tensors.

    Attributes:
        name: the layer's module name in the model (``base_model.model.bert.….query``).
        module: the PEFT tuner layer (e.g. ``peft.tuners.lora.Linear``).
        weight: the base layer's weight W₀ (``<name>.base_layer.weight``).
        adapters: names of the active, unmerged adapters whose ΔW is added.
        tensors: ``real name -> tensor`` of those adapters' parameters (``lora_A``, ``lora_B``, …).
        method: ``"LoRA"``, ``"LoHa"``, …
    """

    name: str
    module: torch.nn.Module
    weight: torch.nn.Parameter
    adapters: tuple[str, ...]
    tensors: dict[str, torch.nn.Parameter]
    method: str

    @property
    def weight_name(self) -> str:
        """The real name of W₀ (``<name>.base_layer.weight``)."""
        return f"{self.name}.base_layer.weight"

    @property
    def trainable(self) -> bool:
        """Whether the effective weight moves in training (an adapter tensor or W₀ itself requires grad)."""
        return self.weight.requires_grad or any(t.requires_grad for t in self.tensors.values())

    def leaves(self) -> list[torch.nn.Parameter]:
        """The tensors that receive the prior's gradient: W₀ if trainable, then the trainable adapter tensors."""
        base = [self.weight] if self.weight.requires_grad else []
        return base + [t for t in self.tensors.values() if t.requires_grad]

    def effective_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """W = W₀ + Σ_adapters ``get_delta_weight(adapter)`` in ``dtype`` (default W₀'s), differentiable."""
        dtype = dtype or self.weight.dtype
        w = self.weight.to(dtype)
        for adapter in self.adapters:
            w = w + self.module.get_delta_weight(adapter).to(dtype)
        return w


@dataclass
class PeftView:
    """A PEFT model seen with the names of the model it adapts (see :func:`peft_view`).

    Attributes:
        prefix: the wrapper prefix of the adapted model's names (``base_model.model.``, under DDP
            ``module.base_model.model.``).
        inner: the adapted model itself (``peft_model.get_base_model()``), for head detection.
        names: plain name (relative to ``inner``) → the real name of the tensor holding its value: the
            base weight ``….base_layer.weight`` for an adapted layer, the active copy
            ``….modules_to_save.<adapter>.…`` for a ``modules_to_save`` module.
        adapted: plain weight name → its :class:`AdaptedLayer`.
        adapter_tensors: real names of the adapters' trainable tensors, in model order.
        hidden: real names that are neither (``original_module`` copies, inactive adapters).
        saved: plain names of the ``modules_to_save`` copies (trained in full: the new head, as a rule).
        methods: the PEFT methods in the model (``["LoRA"]``).
    """

    prefix: str
    inner: torch.nn.Module
    names: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, AdaptedLayer] = field(default_factory=dict)
    adapter_tensors: list[str] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)


def _tuner_prefix(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The name prefix of the adapted model inside a PeftModel (``base_model.model.``) and that model."""
    from peft.tuners.tuners_utils import BaseTuner

    for name, module in model.named_modules():
        if isinstance(module, BaseTuner):
            return (f"{name}.model." if name else "model."), module.model
    return "", model  # adapter layers injected into a plain model (inject_adapter_in_model)


def _refusal(layer_name: str, module: torch.nn.Module, why: str) -> UnsupportedAdapterError:
    supported = "LoRA (Linear/Embedding/Conv layers), LoHa, LoKr, AdaLoRA, VeRA"
    return UnsupportedAdapterError(
        f"the PEFT layer `{layer_name}` ({type(module).__module__}.{type(module).__name__}) is not supported by "
        f"priorzoo's prior: {why}. Supported: {supported}: methods whose merge is W₀ += get_delta_weight(adapter), "
        "so that the prior sees the effective weight W₀ + ΔW"
    )


def _adapted_layer(name: str, module: torch.nn.Module) -> AdaptedLayer | None:
    """Describe one tuner layer, or refuse it; None when no adapter of it is active and unmerged."""
    merged = set(getattr(module, "merged_adapters", ()) or ())
    if getattr(module, "disable_adapters", False):
        active: list[str] = []
    else:
        active = [a for a in module.active_adapters if a not in merged]
    method = next((label for mod, label in _ADDITIVE.items() if type(module).__module__.startswith(mod)), None)
    if method is None:
        label = type(module).__module__.split(".")[2] if type(module).__module__.count(".") >= 2 else "?"
        raise _refusal(name, module, f"the `{label}` method has no additive weight delta ΔW")
    if not active:
        return None
    variants = dict(getattr(module, "lora_variant", {}) or {})
    for adapter, dora in (getattr(module, "use_dora", {}) or {}).items():
        if dora and adapter not in variants:  # peft versions before LoRA variants
            variants[adapter] = type("DoraVariant", (), {})()
    for adapter in active:
        if adapter in variants:
            kind = type(variants[adapter]).__name__.removesuffix("Variant")
            why = (
                "DoRA: it rescales W₀ + ΔW by a learned magnitude vector, which get_delta_weight does not include"
                if "Dora" in kind
                else f"the LoRA variant {kind}, which does not merge as W₀ + get_delta_weight"
            )
            raise _refusal(name, module, f"adapter `{adapter}` is {why}")
        if (getattr(module, "lora_bias", {}) or {}).get(adapter, False):
            why = f"adapter `{adapter}` has lora_bias=True, a bias delta outside get_delta_weight"
            raise _refusal(name, module, why)
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    is_conv1d = type(base).__name__ == "Conv1D"  # transformers' GPT-2 layer (fan_in_fan_out)
    if not (isinstance(base, _BASE_LAYERS) or is_conv1d) or type(weight) is not torch.nn.Parameter:
        raise _refusal(
            name,
            module,
            f"its base layer is a {type(base).__name__} with weight of type {type(weight).__name__} "
            "(quantised or parameter-targeting layers hold no float W₀ to add ΔW to)",
        )
    if not weight.dtype.is_floating_point:
        raise _refusal(name, module, f"its base weight has dtype {weight.dtype}")
    tensors = {}
    for attr in getattr(module, "adapter_layer_names", ()):
        container = getattr(module, attr, None)
        for adapter in active:
            sub = (
                container[adapter]
                if isinstance(container, (torch.nn.ModuleDict, torch.nn.ParameterDict)) and (adapter in container)
                else None
            )
            if sub is None:
                continue
            if isinstance(sub, torch.nn.Parameter):
                tensors[f"{name}.{attr}.{adapter}"] = sub
            elif isinstance(sub, torch.nn.Module):
                for pn, p in sub.named_parameters():
                    tensors[f"{name}.{attr}.{adapter}.{pn}"] = p
    return AdaptedLayer(name, module, weight, tuple(active), tensors, method)


def peft_view(model: torch.nn.Module) -> PeftView | None:
    """See a PEFT model through the names of the model it adapts; None for a model without PEFT modules.

    Each adapted layer's weight appears under its plain name (``….query.weight``, from
    ``….query.base_layer.weight``) and stands for the effective weight W₀ + ΔW; its other base
    parameters (the bias) keep their plain names too; the adapters' own tensors are listed apart;
    ``modules_to_save`` copies appear under the plain names of the module they replace.

    Raises:
        UnsupportedAdapterError: an adapted layer whose effective weight is not W₀ + ``get_delta_weight``
            (DoRA and other LoRA variants, IA³, OFT, quantised base layers, …), naming the layer and why.

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
        >>> view = peft_view(get_peft_model(net, LoraConfig(r=1, target_modules=["0"], modules_to_save=["1"])))
        >>> view.names["0.weight"], view.names["1.weight"]
        ('base_model.model.0.base_layer.weight', 'base_model.model.1.modules_to_save.default.weight')
        >>> view.adapter_tensors
        ['base_model.model.0.lora_A.default.weight', 'base_model.model.0.lora_B.default.weight']
    """
    if not is_peft_model(model):
        return None
    _import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        config = getattr(module, "active_peft_config", None) if _is_peft_module(module) else None
        if config is not None and getattr(config, "is_prompt_learning", False):
            method = str(getattr(config, "peft_type", "prompt learning")).rsplit(".", 1)[-1]
            raise UnsupportedAdapterError(
                f"the PEFT method {method} is prompt learning: it trains virtual tokens and adapts no weight W, so a "
                "prior over the backbone's weights has nothing to act on. Use an additive adapter (LoRA, LoHa, LoKr, "
                "AdaLoRA, VeRA) or full fine-tuning"
            )
    prefix, inner = _tuner_prefix(model)
    view = PeftView(prefix=prefix, inner=inner)
    tuners: dict[str, torch.nn.Module] = {}
    savers: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            tuners[name] = module
        elif type(module).__name__ in ("ModulesToSaveWrapper", "TrainableTokensWrapper") and _is_peft_module(module):
            savers[name] = module
    layers = {name: _adapted_layer(name, module) for name, module in tuners.items()}
    adapter_names = {t for layer in layers.values() if layer is not None for t in layer.tensors}
    for layer in layers.values():
        if layer is not None and layer.method not in view.methods:
            view.methods.append(layer.method)

    for real, p in model.named_parameters():
        plain = _plain_name(real, tuners, savers)
        if plain is None:
            if real in adapter_names and p.requires_grad:
                view.adapter_tensors.append(real)
            else:
                view.hidden.append(real)
            continue
        if not plain.startswith(prefix):
            view.hidden.append(real)
            continue
        plain = plain[len(prefix) :]
        view.names[plain] = real
        if ".modules_to_save." in real:
            view.saved.append(plain)
    for name, layer in layers.items():
        if layer is None:
            continue
        plain = _plain_name(f"{name}.base_layer.weight", tuners, savers)
        if plain is not None and plain.startswith(prefix):
            view.adapted[plain[len(prefix) :]] = layer
    return view


def _plain_name(real: str, tuners: dict[str, torch.nn.Module], savers: dict[str, torch.nn.Module]) -> str | None:
    """``….query.base_layer.weight`` → ``….query.weight``; an adapter's tensor or an inactive copy → None."""
    parts = real.split(".")
    out: list[str] = []
    i = 0
    while i < len(parts):
        out.append(parts[i])
        here = ".".join(out)
        i += 1
        if here in tuners and i < len(parts):
            if parts[i] != "base_layer":
                return None  # lora_A / lora_B / … of this layer
            i += 1  # drop `base_layer` (stacked tuners repeat it)
            while i < len(parts) and parts[i] == "base_layer":
                i += 1
        elif here in savers and i < len(parts):
            saver = savers[here]
            active = getattr(saver, "active_adapters", None) or [getattr(saver, "active_adapter", None)]
            if parts[i] == "modules_to_save" and i + 1 < len(parts) and parts[i + 1] in active:
                i += 2
            elif parts[i] in ("original_module", "modules_to_save", "token_adapter"):
                return None
    return ".".join(out)


def peft_state(model: torch.nn.Module) -> tuple:
    """The adapters' state (active, merged, disabled per PEFT layer); ``()`` for a model without PEFT layers.

    Example:
        >>> peft_state(torch.nn.Linear(2, 2))
        ()
    """
    return tuple(
        (name, tuple(m.active_adapters), tuple(m.merged_adapters), bool(m.disable_adapters))
        for name, m in model.named_modules()
        if _is_peft_module(m) and hasattr(m, "merged_adapters") and hasattr(m, "active_adapters")
    )


@torch.no_grad()
def effective_weights(
    model: torch.nn.Module,
    *,
    include=None,
    exclude=None,
    exclude_head: bool = True,
    head=None,
) -> dict[str, Tensor]:
    """``plain name -> `` a detached copy of every *trainable* block of a PEFT model: W₀ + ΔW for an adapted
    layer, the tensor itself for a trainable plain parameter; frozen weights and the head left out.

    What an L2-SP prior N(W, σ²I) on a LoRA model is centred on (:func:`priorzoo.learn.isotropic_prior`): its
    penalty is then ‖ΔW − ΔW_now‖²/(2σ²) over the adapted layers (‖ΔW‖²/(2σ²) at the adapters' init).

    Args:
        model: a PEFT model.
        include, exclude: patterns on the plain names.
        exclude_head: leave out the head (the ``modules_to_save`` copies, and the task head of the adapted
            model) unless False.
        head: patterns naming the head instead (plain names).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)),
        ...                      LoraConfig(r=1, target_modules=["0"], modules_to_save=["1"]))
        >>> sorted(effective_weights(net))
        ['0.weight']
    """
    from priorzoo.binding.selection import compile_patterns, head_parameter_names

    view = peft_view(model)
    if view is None:
        raise ValueError("`model` holds no PEFT adapter layer (use the model's own parameters)")
    inc, exc = compile_patterns(include), compile_patterns(exclude)
    params = dict(model.named_parameters())
    heads: set[str] = set()
    if exclude_head:
        if head is not None:
            is_head = compile_patterns(head)
            heads = {n for n in view.names if is_head(n)}
        else:
            to_plain = {real: plain for plain, real in view.names.items()}
            heads = {to_plain[view.prefix + n] for n in head_parameter_names(view.inner) if view.prefix + n in to_plain}
            heads |= set(view.saved)
    out: dict[str, Tensor] = {}
    for plain, real in view.names.items():
        if plain in heads or (inc is not None and not inc(plain)) or (exc is not None and exc(plain)):
            continue
        layer = view.adapted.get(plain)
        if layer is not None:
            if layer.trainable:
                out[plain] = layer.effective_weight().detach().clone()
        elif params[real].requires_grad:
            out[plain] = params[real].detach().clone()
    if not out:
        raise ValueError(f"no trainable adapted layer or parameter selected (include={include!r}, exclude={exclude!r})")
    return out


def check_unmerged(model: torch.nn.Module) -> None:
    """Refuse a PEFT model with merged adapters where W₀ itself is to be written (their ΔW is inside W₀).

    Example:
        >>> check_unmerged(torch.nn.Linear(2, 2))
    """
    from priorzoo.validation import short_list as _short

    merged = [n for n, m in model.named_modules() if _is_peft_module(m) and getattr(m, "merged_adapters", None)]
    if merged:
        raise ValueError(
            f"{len(merged)} PEFT layer(s) have merged adapters ({_short(merged, 3)}): their base weight holds W₀ + ΔW. "
            "Call model.unmerge_adapter() first"
        )


def lora_model(
    model: torch.nn.Module,
    *,
    r: int = 8,
    target_modules: Sequence[str] | str,
    alpha: float | None = None,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
    task_type: str | None = None,
) -> torch.nn.Module:
    """Wrap ``model`` in LoRA adapters (``peft.get_peft_model``) for fine-tuning with a prior over W.

    Args:
        model: the model to adapt (its weights are frozen by PEFT).
        r: the LoRA rank (> 0).
        target_modules: module-name suffixes to adapt, e.g. ``["query", "value"]``.
        alpha: ``lora_alpha`` (default ``2·r``, so the scaling s = α/r is 2).
        dropout: ``lora_dropout``.
        modules_to_save: modules trained in full (the new head); default: transformers' own for the task.
        task_type: a PEFT ``TaskType`` name (``"SEQ_CLS"``) or None.

    Example:
        >>> import torch
        >>> net = lora_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), r=2, target_modules=["0"])
        >>> sorted(n.split(".")[-3] for n, p in net.named_parameters() if p.requires_grad)
        ['lora_A', 'lora_B']
    """
    _import_peft()
    from peft import LoraConfig, get_peft_model

    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"the LoRA rank `r` must be a positive integer; received {r!r}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"`target_modules` must name at least one module (e.g. ['query', 'value']); received {target_modules!r}"
        )
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    absent = [t for t in targets if t not in present]
    if absent:
        sample = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _BASE_LAYERS)})
        raise ValueError(
            f"LoRA `target_modules` {absent} name no module of the model; its Linear/Conv/Embedding modules are "
            f"named e.g. {sample[:12]}"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=list(modules_to_save) if modules_to_save is not None else None,
        task_type=task_type,
    )
    return get_peft_model(model, config)
