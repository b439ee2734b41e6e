"""Typed run configurations; the ``dfkd-fast`` CLI flags are generated from these dataclasses.

Every field becomes ``--field-name`` (underscores -> hyphens). ``metadata["help"]`` is the flag's help,
``metadata["required"]`` marks fields that must come from the command line or the YAML file. A YAML file
(``--config FILE``, read with ``yaml.safe_load`` when PyYAML is installed) supplies values for the same
field names; flags given on the command line override it.

No flag may be a prefix of a ``torchrun`` option (``torchrun`` parses abbreviations), so every name is
spelled out: ``--num-images``, ``--num-classes`` ...
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SynthesizeConfig", "DistillConfig", "DemoConfig", "ExportPngConfig", "InspectConfig", "parse_image_size",
           "parse_floats", "parse_opts", "load_yaml", "split_method_options", "merge_config", "TORCHRUN_OPTIONS"]

#: ``torchrun`` options (both spellings); the CLI test checks no flag of ours is a prefix of one of them.
TORCHRUN_OPTIONS = (
    "--nnodes", "--nproc-per-node", "--nproc_per_node", "--rdzv-backend", "--rdzv_backend", "--rdzv-endpoint",
    "--rdzv_endpoint", "--rdzv-id", "--rdzv_id", "--rdzv-conf", "--rdzv_conf", "--standalone",
    "--max-restarts", "--max_restarts", "--monitor-interval", "--monitor_interval", "--start-method",
    "--start_method", "--role", "--module", "--no-python", "--no_python", "--run-path", "--run_path",
    "--log-dir", "--log_dir", "--redirects", "--tee", "--local-ranks-filter", "--local_ranks_filter",
    "--node-rank", "--node_rank", "--master-addr", "--master_addr", "--master-port", "--master_port",
    "--local-addr", "--local_addr", "--logs-specs", "--logs_specs", "--rdzv-timeout", "--rdzv_timeout",
    "--signals-to-handle", "--event-log-handler", "--numa-binding", "--virtual-local-rank",
)


def _f(default: Any = dataclasses.MISSING, help: str = "", required: bool = False, **kw: Any) -> Any:
    meta = {"help": help, "required": required}
    if "choices" in kw:  # the flag accepts only these values
        meta["choices"] = tuple(kw["choices"])
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SynthesizeConfig:
    """``dfkd-fast synthesize``: write a transfer set synthesized from a teacher."""

    teacher: str = _f(None, "teacher: a zoo name (lenet5, resnet34, ...) or 'package.module:factory'", True)
    weights: str | None = _f(None, "teacher weights (.safetensors or a torch state_dict loaded with weights_only)")
    num_classes: int = _f(10, "number of classes K of the teacher")
    image_size: str = _f("3,32,32", "teacher input size 'C,H,W'")
    method: str = _f(None, "synthesis method (see `dfkd-fast info`)", True)
    num_images: int = _f(None, "number of images to synthesize", True)
    out: str = _f(None, "output directory of the transfer set", True)
    batch_size: int = _f(64, "images per synthesis batch")
    seed: int = _f(0, "base seed; batch b uses a seed derived from (seed, b)")
    mean: str | None = _f(None, "teacher input normalization mean, 'm' or 'm1,m2,m3'")
    std: str | None = _f(None, "teacher input normalization std, 's' or 's1,s2,s3'")
    resume: bool = _f(False, "continue an interrupted run in --out")
    device: str = _f("auto", "device: auto (cuda when available), cpu, cuda, cuda:1 ...")
    backend: str = _f("auto", "fused-op backend: auto, triton, cpp, torch")
    shard_size: int = _f(1024, "images per shard (rounded up to a multiple of --batch-size)")
    store: str = _f("uint8", "image storage: uint8 or fp16")
    preview: int = _f(64, "images in the PNG grid preview (0: none)")
    compile: str = _f("off", "torch.compile the per-step function (reduce-overhead: CUDA graphs on a GPU)",
                      choices=("off", "default", "reduce-overhead", "max-autotune"))
    precision: str = _f("fp32", "autocast dtype of the teacher and generator forward (BN statistics and losses "
                                "stay fp32)", choices=("fp32", "bf16", "fp16"))
    distributed: bool = _f(False, "multi-process synthesis: run under torchrun, one rank per process (NCCL/gloo)")
    student: str | None = _f(None, "student for the adversarial / competition terms (zoo name or "
                                   "'package.module:factory'); required by zskt, optional for cmi, dfq, fast_meta, "
                                   "deep_inversion")
    student_weights: str | None = _f(None, "weights of --student (optional; default: freshly initialized)")
    reference_images: str | None = _f(None, "impression_space: images whose impression code is synthesized "
                                            "(a folder of PNG/JPEG files or a transfer-set directory)")
    opt: list[str] = _f(help="method option key=value (repeatable)", default_factory=list)


@dataclass
class DistillConfig:
    """``dfkd-fast distill``: train a student on a transfer set by KD from the teacher."""

    transfer_set: str | None = _f(None, "transfer set directory written by `dfkd-fast synthesize` (required "
                                        "unless --online)")
    teacher: str = _f(None, "teacher: zoo name or 'package.module:factory'", True)
    weights: str | None = _f(None, "teacher weights file")
    student: str = _f(None, "student: zoo name or 'package.module:factory'", True)
    student_weights: str | None = _f(None, "initial student weights (optional)")
    num_classes: int = _f(10, "number of classes K")
    image_size: str = _f("3,32,32", "input size 'C,H,W'")
    mean: str | None = _f(None, "input normalization mean")
    std: str | None = _f(None, "input normalization std")
    epochs: int = _f(20, "KD epochs over the transfer set")
    lr: float = _f(0.1, "SGD learning rate (momentum 0.9)")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    grad_clip: float = _f(5.0, "clip the student's gradient norm at this value in every KD step (0: off); keeps KD "
                               "stable on over-confident transfer sets and lets one lr serve BN-free students")
    temperature: float = _f(20.0, "KD temperature T")
    batch_size: int = _f(128, "KD batch size")
    schedule: str = _f("cosine", "learning-rate schedule: cosine, step or constant")
    augment: str = _f("none", "augmentation of the transfer images: none, crop (pad-crop) or crop_flip (+ flip)")
    test_set: str | None = _f(None, "real test set for evaluation: mnist5k, digits, none, an ImageFolder directory "
                                    "(<dir>/<class>/*.png) or a .pt/.safetensors file with images (N,C,H,W) and "
                                    "labels (N,)")
    out: str = _f("runs/distill", "output directory (checkpoint.pt, metrics.jsonl, curves.png, student.safetensors)")
    resume: bool = _f(False, "continue from the last checkpoint in --out (same schedule flags)")
    seed: int = _f(0, "seed of the student's initialization, the batch order and the augmentation")
    device: str = _f("auto", "device")
    backend: str = _f("auto", "fused-op backend")
    allow_teacher_mismatch: bool = _f(False, "distill even if the teacher's fingerprint differs from the one in the "
                                             "transfer set's manifest (recorded in metrics.jsonl and the checkpoint)")
    # ---- online distillation (`dfkd-fast distill --online --method M`; dfkd_fast.tasks.distill.distill_online)
    online: bool = _f(False, "synthesize the transfer set while the student trains, each method on its paper's "
                             "schedule (needs --method; no --transfer-set)")
    method: str | None = _f(None, "--online: synthesis method (any registered generator or pixel method)")
    ep_steps: int = _f(400, "--online: student steps per epoch; an epoch is ep_steps // kd_steps rounds")
    kd_steps: int = _f(400, "--online: student steps per round (one synthesized batch per round; DAFL/ZSKT/DFQ: a "
                            "generator step every n_s of them)")
    warmup: int | None = _f(None, "--online: first epochs that only synthesize (no adversarial term, no KD); "
                                  "default: the first fifth of the rounds for dafl, dfq and zskt, none otherwise")
    synthesis_batch_size: int | None = _f(None, "--online: images per synthesized batch (default: --batch-size)")
    pool_capacity: int | None = _f(None, "--online: keep at most this many synthesized images in the on-device "
                                         "pool (default: all)")
    reference_images: str | None = _f(None, "--online --method impression_space: images whose impression code is "
                                            "synthesized (PNG/JPEG folder or transfer-set directory)")
    opt: list[str] = _f(help="--online: method option key=value (repeatable)", default_factory=list)


@dataclass
class DemoConfig:
    """``dfkd-fast demo``: MNIST-5k teacher -> Data Impressions -> LeNet-5-half student, in minutes on a CPU."""

    out: str = _f("runs/demo", "output directory")
    num_images: int = _f(12000, "number of Data Impressions to synthesize")
    iterations: int = _f(150, "Adam steps per impression batch")
    lr: float = _f(0.05, "initial Adam learning rate of the [0, 1] impression pixels (linear decay to 0)")
    init_scale: float = _f(0.1, "impressions start from U[0, init_scale] noise (dim: MNIST inputs are mostly black)")
    batch_size: int = _f(200, "impressions per batch")
    temperature: float = _f(20.0, "temperature tau of the impression loss (ZSKD)")
    kd_temperature: float = _f(4.0, "KD temperature T of the students")
    kd_epochs: int = _f(30, "KD epochs of the students")
    kd_lr: float = _f(0.01, "student SGD learning rate (momentum 0.9, weight decay 5e-4, cosine)")
    kd_augment: str = _f("crop", "augmentation of the impressions during KD: none, crop or crop_flip")
    teacher_epochs: int | None = _f(None, "teacher training epochs (first run only; default: the teachers module's)")
    seed: int = _f(0, "seed")
    quick: bool = _f(False, "tiny sizes for a smoke test (well under a minute)")
    device: str = _f("auto", "device")
    backend: str = _f("auto", "fused-op backend")
    cache_dir: str | None = _f(None, "teacher cache directory (default: the teachers module's default)")


@dataclass
class ExportPngConfig:
    """``dfkd-fast export-png``: write a transfer set out as an image folder."""

    transfer_set: str = _f(None, "transfer set directory", True)
    out: str = _f(None, "output image folder", True)
    overwrite: bool = _f(False, "replace an earlier export in --out (a non-empty --out is refused otherwise)")


@dataclass
class InspectConfig:
    """``dfkd-fast inspect DIR``: the data-free health report of a transfer set (text, health.json, health.png)."""

    transfer_set: str = _f(None, "transfer set directory (or give it as the positional DIR)", True)
    teacher: str = _f(None, "teacher: zoo name or 'package.module:factory'", True)
    weights: str | None = _f(None, "teacher weights file")
    num_classes: int = _f(10, "number of classes K")
    image_size: str = _f("3,32,32", "input size 'C,H,W'")
    mean: str | None = _f(None, "input normalization mean")
    std: str | None = _f(None, "input normalization std")
    out: str | None = _f(None, "directory for health.json and health.png (default: the transfer set directory)")
    max_images: int = _f(2000, "evaluate a seeded random sample of at most this many images")
    seed: int = _f(0, "seed of the sample and of the noise reference")
    device: str = _f("auto", "device")


def parse_image_size(text: str | Sequence[int]) -> tuple[int, int, int]:
    """'C,H,W' -> (C, H, W) with every entry >= 1."""
    if not isinstance(text, str):
        try:
            if any(isinstance(v, bool) or float(v) != int(v) for v in text):
                raise TypeError
            vals = tuple(int(v) for v in text)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"--image-size must be three positive integers 'C,H,W', e.g. 3,32,32; got {text!r}"
                             ) from None
    else:
        try:
            vals = tuple(int(v) for v in text.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(f"--image-size must be 'C,H,W' with integers, e.g. 3,32,32; got {text!r}") from None
    if len(vals) != 3 or min(vals) < 1:
        raise ValueError(f"--image-size must be three positive integers 'C,H,W', e.g. 3,32,32; got {text!r}")
    return vals  # type: ignore[return-value]


def parse_floats(text: str | Sequence[float] | float | None, name: str) -> list[float] | None:
    """'0.5,0.5,0.5' -> [0.5, 0.5, 0.5]; ``None`` stays ``None``.

    Every value must be finite; for ``name == "std"`` (a normalization divisor) every value must be > 0.

    Raises:
        ValueError: not numbers, empty, NaN/Inf, or a std <= 0 (the message names ``--{name}``).
    """
    if text is None:
        return None
    try:
        if isinstance(text, str):
            vals = [float(v) for v in text.split(",") if v.strip()]
        elif isinstance(text, (int, float)) and not isinstance(text, bool):
            vals = [float(text)]
        else:
            if any(isinstance(v, bool) for v in text):
                raise TypeError
            vals = [float(v) for v in text]
    except (TypeError, ValueError):
        raise ValueError(f"--{name} must be comma-separated numbers, e.g. 0.5,0.5,0.5; got {text!r}") from None
    if not vals:
        raise ValueError(f"--{name} must be comma-separated numbers, e.g. 0.5,0.5,0.5; got {text!r}")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"--{name} must be finite numbers (no nan/inf), got {text!r}")
    if name == "std" and min(vals) <= 0:
        raise ValueError(f"--std must be > 0 (inputs are divided by it), got {text!r}")
    return vals


def _convert(value: Any, typ: Any, key: str) -> Any:
    """Convert a string option to the type of a Config field (bool, int, float, str, tuples).

    Non-string values (YAML) are checked instead: a bool for bool, an int (not a bool) for int, a finite
    number for float. Float values must be finite in either form.
    """
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    t = t.replace(" ", "")
    if not isinstance(value, str):
        if value is None:
            return value
        ok = True
        if t.startswith("bool"):
            ok = isinstance(value, bool)
        elif t.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t.startswith("float"):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        if not ok:
            raise ValueError(f"option {key}={value!r}: expected a {'finite ' if t.startswith('float') else ''}"
                             f"value of type {t}")
        return value
    try:
        if t.startswith("bool"):
            low = value.lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return low in ("1", "true", "yes")
        if t.startswith("int"):
            return int(value)
        if t.startswith("float"):
            f = float(value)
            if not math.isfinite(f):
                raise ValueError
            return f
        if t.startswith("tuple") or t.startswith("list"):
            inner = float if "float" in t else int if "int" in t else str
            seq = [inner(v) for v in value.split(",") if v.strip()]
            return tuple(seq) if t.startswith("tuple") else seq
    except ValueError:
        raise ValueError(f"option {key}={value!r}: expected a value of type {t}") from None
    return value


def parse_opts(method_config: type, opts: Sequence[str] | dict[str, Any]) -> dict[str, Any]:
    """Turn ``key=value`` strings (or a dict) into typed keyword overrides of a method's ``Config``.

    Raises:
        ValueError: unknown key (the message lists the method's options) or a value of the wrong type.
    """
    from dfkd_fast.synthesis.base import canonical_option

    fields = {f.name: f for f in dataclasses.fields(method_config)}
    items: list[tuple[str, Any]] = []
    if isinstance(opts, dict):
        items = list(opts.items())
    else:
        for o in opts:
            if "=" not in o:
                raise ValueError(f"--opt expects key=value, got {o!r}")
            k, v = o.split("=", 1)
            items.append((k.strip(), v.strip()))
    out: dict[str, Any] = {}
    for k, v in items:
        key = canonical_option(method_config, k)  # aliases: lr <-> lr_g, T <-> temperature
        if key not in fields:
            raise ValueError(f"unknown option {k!r} for this method; its options are: {', '.join(sorted(fields))}")
        out[key] = _convert(v, fields[key].type, key)
    return out


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML (or JSON) config file with ``yaml.safe_load``; keys may use hyphens or underscores."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path) as f:
        text = f.read()
    try:
        import yaml
    except ImportError:
        import json

        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: PyYAML is not installed, so only JSON config files can be read") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def split_method_options(data: dict[str, Any], config_cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config-file mapping into (fields of ``config_cls``, everything else).

    ``dfkd-fast synthesize`` takes the method's hyper-parameters at the top level of the file (``bn: 1.0``
    beside ``method: cmi``); the second mapping holds them. They are checked against the chosen method's
    ``Config`` later (an unknown key is an error there). The ``opt:`` list keeps working and wins.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}
    known = {k: v for k, v in data.items() if k in names}
    return known, {k: v for k, v in data.items() if k not in names}


def merge_config(cls: type, *layers: dict[str, Any]) -> Any:
    """Build ``cls`` from dataclass defaults overridden by each mapping in ``layers`` in turn.

    Unknown keys and missing required fields raise ``ValueError`` naming the flag.
    """
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if k not in names:
                raise ValueError(f"unknown option {k!r}; known: {', '.join(sorted(names))}")
            values[k] = _check_value(k, v, names[k].type)
    for name, f in names.items():
        if f.metadata.get("required") and values.get(name) is None:
            raise ValueError(f"the argument --{name.replace('_', '-')} is required")
    return cls(**values)


#: int fields that may be negative (every other int field is a count, size or index: >= 0).
_SIGNED_INTS = frozenset({"seed"})
#: str fields that also take a YAML list of numbers (parsed later by parse_image_size / parse_floats).
_LIST_STRS = frozenset({"image_size", "mean", "std"})


def _check_value(key: str, value: Any, typ: Any) -> Any:
    """Check (and for YAML, normalize) ``value`` of field ``key`` whose annotation is ``typ``.

    int fields take ints (not bools), >= 0 except :data:`_SIGNED_INTS`; float fields take finite numbers;
    bool fields take bools; list fields take a list of strings (a single string or a mapping is turned into a
    one-entry / ``key=value`` list); str fields take strings (numbers become strings; lists only for
    :data:`_LIST_STRS`). ``None`` is kept for optional fields.

    Raises:
        ValueError: one line naming ``--key`` (and the YAML key) and the expected type or range.
    """
    t = (typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))).replace(" ", "")
    flag = "--" + key.replace("_", "-")
    where = f"{flag} (config key {key!r})"
    if value is None:
        if t.endswith("|None") or t.startswith("None|") or t.startswith("Optional"):
            return None
        raise ValueError(f"{where} must not be empty (null)")
    if t.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"{where} expects true or false, got {value!r}")
        return value
    if t.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ValueError(f"{where} expects an integer (int), got {value!r} ({type(value).__name__}); "
                                 "write it without quotes, e.g. 64")
        if value < 0 and key not in _SIGNED_INTS:
            raise ValueError(f"{flag} must be >= 0, got {value}")
        return value
    if t.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} expects a number (float), got {value!r} ({type(value).__name__}); "
                             "write it without quotes, e.g. 0.1")
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        return float(value)
    if t.startswith("list"):
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [f"{k}={v}" for k, v in value.items()]
        if not isinstance(value, (list, tuple)) or ("[str]" in t and not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where} expects a list of key=value strings, got {value!r}")
        return list(value)
    if t.startswith("str"):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (list, tuple)) and key in _LIST_STRS:
            return value
        raise ValueError(f"{where} expects a string, got {value!r} ({type(value).__name__})")
    return value
