"""What gradscope knows about a model's anatomy: its trainable parameters by layer, whether it has normalisation or
residual connections, what role a sigmoid/tanh plays, the module inside a compile/DDP wrapper, and the context the
detectors judge with (:class:`gradscope.detectors.Context`)."""

from __future__ import annotations

import re

from torch import nn

from .detectors import ADAPTIVE, SATURATING, Context


_RESIDUAL_CLASS = re.compile(r"^(Block|Bottleneck|BasicBlock|PreActBlock|Res(idual|net)?(Block|Unit|Layer)|"
                             r"InvertedResidual|ConvNeXtBlock|BertLayer|\w*(Encoder|Decoder|Transformer)(Layer|Block)|"
                             r"(GPT2|GPTNeo|GPTJ|T5|Bloom|Falcon|Swin|Mixer|Vit|ViT|CLIP|Siglip|Opt|OPT)"
                             r"\w*(Block|Layer))$")
_NORM_CLASS = re.compile(r"(Batch|Layer|Group|Instance|Rms|RMS)Norm")


def has_norm(model: nn.Module) -> bool:
    """Whether ``model`` has normalisation layers: PyTorch's (BatchNorm/InstanceNorm, LayerNorm, GroupNorm, RMSNorm)
    or any class named like one (``LlamaRMSNorm``, timm's ``LayerNorm2d``, ``BatchNormAct2d``)."""
    kinds = tuple(c for c in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None))
                  if c is not None)
    return any(isinstance(m, kinds) or _NORM_CLASS.search(type(m).__name__) for m in model.modules())


def has_residual(model: nn.Module) -> bool:
    """Whether ``model`` has residual connections, judged from its block classes (ResNet ``BasicBlock`` /
    ``Bottleneck``, transformer ``*Block`` / ``*EncoderLayer`` / ``BertLayer``, ``InvertedResidual``, ...), minus blocks
    that say they have none (``shortcut = None``, ``has_skip = False``). Only decides whether a remedy may recommend
    adding them."""
    for m in model.modules():
        if _RESIDUAL_CLASS.search(type(m).__name__):
            if getattr(m, "shortcut", True) is None or getattr(m, "has_skip", True) is False \
                    or getattr(m, "has_residual", True) is False:
                continue
            return True
    return False


def class_name(module: nn.Module) -> str:
    """The module's class name as its author wrote it: FSDP2's ``fully_shard`` swaps in a subclass ``FSDP<Name>``."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and cls.__module__.startswith("torch.distributed.fsdp"):
        for base in cls.__bases__:
            if not base.__module__.startswith("torch.distributed.fsdp"):
                return base.__name__
    return cls.__name__


def trainable_params(model: nn.Module) -> tuple[list, dict]:
    """``([(qualified name, module name, parameter)], {module name: {"module": class, "params": count}})`` of the
    trainable parameters, each once, in module order; empty tensors have no statistics and are left out."""
    params, seen, module_info = [], set(), {}
    for mname, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False)
               if p.requires_grad and p.numel() > 0 and id(p) not in seen]
        for pn, p in own:
            seen.add(id(p))
            params.append((f"{mname}.{pn}" if mname else pn, mname, p))
        module_info[mname] = {"module": class_name(module), "params": sum(p.numel() for _, p in own)}
    return params, module_info


def detector_context(model: nn.Module, optimizer) -> Context:
    ctx = Context(has_norm=has_norm(model), has_residual=has_residual(model))
    if optimizer is not None:
        ctx.optimizer = type(optimizer).__name__
        eps = [g["eps"] for g in optimizer.param_groups if isinstance(g.get("eps"), (int, float))]
        ctx.adaptive = ctx.optimizer in ADAPTIVE or bool(eps and "betas" in optimizer.defaults)
        if ctx.adaptive:
            # no float eps (Lion's sign update; Adafactor's pair of eps added to squares): any nonzero gradient moves
            ctx.eps = float(min(eps)) if eps else 0.0
    return ctx


_GATE_NAME = re.compile(r"(^|[._:])(gate|gates|se|attn|attention|excite|excitation)([._:#]|$)", re.I)
_GATE_CLASS = re.compile(r"(SqueezeExcit|SEModule|SELayer|Gate|Attention|EffectiveSE)", re.I)


def inside_activation(owner: nn.Module) -> bool:
    """Whether a functional sigmoid/tanh called by ``owner`` is part of an activation function rather than a layer's
    activation: ``owner`` is a parameter-free leaf module that is not itself a sigmoid/tanh (GELU's tanh
    approximation, SiLU/Swish, Mish, QuickGELU). Such a call is not a site: its saturation only says the outer
    activation is in its linear or zero regime, which is no fault, so it is neither measured nor shown (and a model
    whose only functional calls are these runs without the functional-call mode after its first passes).

    A module that is a sigmoid/tanh (a subclass of ``nn.Sigmoid``/``nn.Tanh``, or a class of that name, as timm's
    ``Sigmoid``) is the layer's activation: its call is a site, judged like ``nn.Tanh``. Other parameter-free
    wrappers (``Lambda(torch.tanh)``) and buffer-only layers count as activation functions: gradscope cannot tell
    them from a GELU (Hugging Face's ``GELUTanh`` calls ``torch.tanh`` in its Python variant), and a false saturation
    alert is worse than none."""
    if isinstance(owner, (nn.Sigmoid, nn.Tanh)) or class_name(owner) in SATURATING:
        return False
    return next(owner.parameters(recurse=True), None) is None and next(owner.children(), None) is None


def activation_role(site: str, owner: nn.Module | None, kind: str, broadcast: bool) -> str | None:
    """``"gate"`` for a sigmoid/tanh site that is meant to saturate, else None: a sigmoid that multiplies something
    (squeeze-excite, attention or LSTM-style gates), known by its name, its owner's class, or an output that
    broadcasts over positions ((N, C, 1, 1)). (Older logs may also hold ``"inner"``: a sigmoid/tanh inside an
    activation function, see :func:`inside_activation`, which is no longer a site.)
    """
    if kind not in ("sigmoid", "tanh"):
        return None
    if broadcast or _GATE_NAME.search(site) or (owner is not None and _GATE_CLASS.search(type(owner).__name__)):
        return "gate"
    return None


def unwrap(model: nn.Module, ddp: bool = True) -> nn.Module:
    """The module inside a ``torch.compile(model)``, ``DistributedDataParallel`` or ``DataParallel`` wrapper (with
    ``ddp=False``: inside compile wrappers only): its hooks fire when the wrapper runs, and its layer names are the
    user's (``"0"``, not ``"module.0"``)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
        elif ddp and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
