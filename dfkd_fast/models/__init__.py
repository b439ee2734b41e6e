"""Model zoo: classifiers of the DFKD literature, generators, and checkpoint loading.

``build_model(name, num_classes, in_channels, image_size)`` builds a zoo classifier; ``load_model(spec, weights)``
builds from a zoo name or an importable ``package.module:factory`` and loads safetensors / ``weights_only``
checkpoints with errors that name the offending file or keys.
"""
from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from dfkd_fast.models.generators import DCGANGenerator, Generator
from dfkd_fast.models.lenet import LeNet5, lenet5, lenet5_bn, lenet5_half
from dfkd_fast.models.resnet import BasicBlock, ResNet, resnet8, resnet18, resnet34
from dfkd_fast.models.vgg import VGG, vgg11_bn
from dfkd_fast.models.wrn import WideResNet, wrn16_1, wrn16_2, wrn40_1, wrn40_2

__all__ = ["build_model", "list_models", "load_model", "load_state_dict_file", "save_model", "classifier_weight",
           "last_linear",
           "Generator", "DCGANGenerator", "LeNet5", "ResNet", "BasicBlock", "WideResNet", "VGG", "MODELS"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": lenet5,
    "lenet5_half": lenet5_half,
    "lenet5_bn": lenet5_bn,
    "resnet8": resnet8,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "wrn16_1": wrn16_1,
    "wrn16_2": wrn16_2,
    "wrn40_1": wrn40_1,
    "wrn40_2": wrn40_2,
    "vgg11_bn": vgg11_bn,
}


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODELS)


def _norm_name(name: str) -> str:
    """Case-insensitive, ignoring '-' and '_' ("LeNet-5-Half" -> "lenet5_half")."""
    flat = name.strip().lower().replace("-", "").replace("_", "")
    return next((k for k in MODELS if k.replace("_", "") == flat), flat)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a zoo classifier with fresh weights.

    Args:
        name: one of :func:`list_models` (``-`` and ``_`` are interchangeable, case-insensitive).
        num_classes: logits K.
        in_channels: input channels C (1 for MNIST).
        image_size: input height = width.

    Shape:
        the model maps (N, C, image_size, image_size) -> (N, K).
    """
    key = _norm_name(name) if isinstance(name, str) else ""
    if key not in MODELS:
        raise ValueError(f"build_model: unknown model {name!r}; choose one of {', '.join(MODELS)} "
                         "or pass 'package.module:factory' to load_model")
    for arg, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"build_model: {arg} must be a positive int, got {v!r}")
    return MODELS[key](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def _from_factory(spec: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"load_model: spec {spec!r} must be a zoo name or 'package.module:factory'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"load_model: cannot import module {mod_name!r} from spec {spec!r} ({e}); "
                         "check the module is on sys.path / PYTHONPATH") from e
    obj: object = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"load_model: module {mod_name!r} has no attribute {attr!r} (spec {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"load_model: {spec!r} is not callable")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    kwargs = {k: v for k, v in offered.items() if k in params or (has_var_kw and k == "num_classes")}
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"load_model: factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module")
    return model


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict or the common wrappers {'state_dict': ...} / {'model': ...}; strip 'module.'."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"load_model: {path} does not contain a state_dict (a mapping of names to tensors)")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_model: weights file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: object = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure: report the file and the underlying reason
        raise ValueError(f"load_model: cannot read checkpoint {path!r} ({type(e).__name__}: {e}); "
                         "expected a .safetensors file or a torch.save'd state_dict loadable with weights_only=True"
                         ) from e
    return _unwrap(obj, path)


def load_model(spec: str | nn.Module, weights: str | os.PathLike | None = None, num_classes: int = 10,
               in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a model from a zoo name or ``package.module:factory`` and optionally load weights.

    Args:
        spec: zoo name (see :func:`list_models`), ``package.module:factory`` (called with those of
            ``num_classes`` / ``in_channels`` / ``image_size`` it accepts), or an ``nn.Module`` instance.
        weights: ``.safetensors`` or ``torch.save`` state_dict file; ``None`` keeps the fresh weights.
        num_classes, in_channels, image_size: passed to the builder.

    Returns:
        the model (CPU, train mode unchanged; call ``.eval()`` for a teacher).

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: unknown spec, unimportable factory, unreadable checkpoint, or missing / unexpected /
            mis-shaped keys (named in the message).
    """
    if isinstance(spec, nn.Module):
        model = spec
    elif not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"load_model: spec must be a zoo name or 'package.module:factory', got {spec!r}")
    elif ":" in spec:
        model = _from_factory(spec.strip(), num_classes, in_channels, image_size)
    else:
        model = build_model(spec, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    if weights is None:
        return model
    sd = load_state_dict_file(weights)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                         f"({len(unexpected)})")
        raise ValueError(f"load_model: checkpoint {os.fspath(weights)!r} does not match {spec!r}: "
                         f"{'; '.join(parts)}; check the architecture name / num_classes / in_channels")
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"load_model: checkpoint {os.fspath(weights)!r} has mis-shaped tensors for {spec!r}: "
                         f"{'; '.join(bad[:6])}; check num_classes / in_channels / the architecture")
    model.load_state_dict(sd, strict=True)
    return model


def save_model(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Save ``model.state_dict()`` as safetensors, atomically (temp file + ``os.replace``).

    Shared / non-contiguous tensors are copied so that any state_dict can be written.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(sd, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (the classifier of every zoo model)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; a model whose last nn.Linear maps "
                         "features to logits is needed (or pass the final layer's weight (K, F) explicitly)")
    return last


def classifier_weight(model: nn.Module) -> torch.Tensor:
    """Weight (K, F) of the last ``nn.Linear`` registered in ``model`` (the classifier of every zoo model).

    Shape:
        returns (K, F); used by Data Impressions' class similarity C = W W^T / (|w_i| |w_j|).
    """
    return last_linear(model).weight
