"""One interface for every synthesis method: ``Synthesizer.synthesize(targets=None) -> SynthesisResult``.

A method subclasses :class:`Synthesizer`, declares its hyper-parameters as a nested ``Config`` dataclass
(published defaults, names DFKD researchers know: ``bn``, ``oh``, ``adv``, ``lr_g`` ...), implements
``_synthesize(targets)`` and, if it keeps state across batches (a meta generator, a memory bank, an
optimizer), extends ``state_dict`` / ``load_state_dict`` so an interrupted run resumes exactly.

Constructor signatures. Every subclass gets a real keyword signature (``inspect.signature(cls)``, ``help()``):
``(teacher, num_classes, image_size, config=None, *, batch_size=64, ..., <its own keywords>, <every Config
field with its default>)``, generated from the ``Config`` dataclass by :meth:`Synthesizer.__init_subclass__`.
Hyper-parameters are checked against the field types (:func:`resolve_config`): a wrong value raises a
one-line ``ValueError`` such as ``deep_inversion: lr must be a float > 0, got 'abc'``; numeric strings
(``"1e-3"`` from YAML) and lists (for tuple fields) are converted.

One name per concept, with aliases (:data:`OPTION_ALIASES`): the learning rate of what a method optimizes is
``lr`` for the pixel methods and ``lr_g`` for the generator methods; either name is accepted by every method
and mapped to the one its ``Config`` has. Likewise ``T`` <-> ``temperature``. Passing both spellings is an error.

The teacher. While a synthesizer lives it holds its teacher in eval mode with every parameter's
``requires_grad`` off (BN running statistics are the synthesis target and must not move). :meth:`Synthesizer.close`
(or ``with``, or dropping the last synthesizer of that teacher) restores each submodule's ``training`` flag and
each parameter's ``requires_grad`` as they were before the first synthesizer of that teacher was built (a flag
the caller has changed back meanwhile is left as the caller set it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
import types
import typing
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dfkd_fast import comm

#: ``precision=`` choices: autocast dtype of the teacher / generator forward (statistics and losses stay fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``compile=`` choices: ``torch.compile`` mode of the per-step function ("off": eager).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")

#: Methods that work on a teacher without BatchNorm layers (named in error messages).
BN_FREE_METHODS = ("data_impressions", "class_impressions", "dafl", "zskt", "impression_space")


@dataclass(frozen=True)
class SynthesisResult:
    """One synthesized batch.

    Attributes:
        images: (N, C, H, W) float in [0, 1] (before the teacher's input normalization), detached.
        targets: (N,) long class targets, or (N, K) soft targets, that the batch was optimized for.
        teacher_logits: (N, K) teacher logits on the (normalized) images, detached.
        losses: total loss per optimization step (for loss curves).
        seconds: wall-clock seconds spent on the batch.
    """

    images: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor
    losses: tuple[float, ...]
    seconds: float


@dataclass
class SynthesisConfig:
    """Hyper-parameters shared by all methods; each method's ``Config`` subclasses this."""

    iterations: int = 200  # optimization steps per batch


REGISTRY: dict[str, type[Synthesizer]] = {}


def register(name: str):
    """Class decorator adding a synthesizer to :data:`REGISTRY` under ``name``."""

    def deco(cls: type[Synthesizer]) -> type[Synthesizer]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ValueError(f"synthesis method {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(REGISTRY)


def build_synthesizer(name: str, teacher: nn.Module, num_classes: int, image_size: Sequence[int],
                      **kwargs: Any) -> Synthesizer:
    """Instantiate method ``name``; unknown names raise ``ValueError`` listing the known ones."""
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise ValueError(f"unknown synthesis method {name!r}; choose one of: {', '.join(list_methods())}")
    return REGISTRY[key](teacher, num_classes, image_size, **kwargs)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------- typed hyper-parameters
#: Alternative spellings of one concept: a key a method's ``Config`` lacks is mapped to its partner when the
#: ``Config`` has that one (``lr`` <-> ``lr_g``, ``temperature`` <-> ``T``).
OPTION_ALIASES: dict[str, str] = {"lr": "lr_g", "lr_g": "lr", "temperature": "T", "T": "temperature"}

#: Fields that must be > 0 (learning rates and temperatures) and integers that must be >= 1.
_POSITIVE_FIELDS = ("lr", "lr_g", "lr_z", "lr_head", "temperature", "T", "cr_T")
_AT_LEAST_ONE_FIELDS = ("iterations",)

_HINTS: dict[type, dict[str, Any]] = {}


def canonical_option(config_cls: type, key: str) -> str:
    """The ``Config`` field that option ``key`` names (``key`` itself, its alias, or ``key`` when neither)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    key = key.replace("-", "_")
    if key not in names and OPTION_ALIASES.get(key) in names:
        return OPTION_ALIASES[key]
    return key


def _field_hints(config_cls: type) -> dict[str, Any]:
    hints = _HINTS.get(config_cls)
    if hints is None:
        try:
            hints = typing.get_type_hints(config_cls)
        except Exception:  # an annotation that cannot be resolved: values of that Config are not type-checked
            hints = {}
        _HINTS[config_cls] = hints
    return hints


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        return "a float"
    if tp is int:
        return "an int"
    if tp is bool:
        return "a bool"
    if tp is str:
        return "a string"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of ({_describe(args[0])})"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``; raises ``TypeError`` when it cannot be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _coerce(value, a)
            except TypeError:
                continue
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError
    if tp is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is float:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args and len(value) != len(args):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=False)) if args else tuple(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TypeError
    return value


def resolve_config(method: str, config_cls: type, config: Any = None, overrides: dict[str, Any] | None = None
                   ) -> Any:
    """A checked ``config_cls`` instance: ``config`` (default: the defaults) with ``overrides`` applied.

    Option names may use aliases (:data:`OPTION_ALIASES`) and hyphens. Every field is converted to its
    annotated type (numeric strings, lists for tuples); learning rates and temperatures must be > 0 and
    ``iterations`` >= 1.

    Raises:
        ValueError: one line naming ``method`` and the field: unknown name (lists the known ones), both an
            option and its alias given, or a value of the wrong type / range.
    """
    cfg = config if config is not None else config_cls()
    if not isinstance(cfg, config_cls):
        raise ValueError(f"{method}: config must be a {config_cls.__name__}, got {type(cfg).__name__}")
    known = {f.name for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in (overrides or {}).items():
        name = canonical_option(config_cls, key)
        if name not in known:
            raise ValueError(f"{method}: unknown hyper-parameter(s) [{key!r}]; known: {sorted(known)}")
        if name in given_as:
            raise ValueError(f"{method}: {given_as[name]!r} and {key!r} name the same hyper-parameter "
                             f"{name!r}; pass one of them")
        given_as[name] = key
        values[name] = value
    hints = _field_hints(config_cls)
    checked: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        value = values.get(f.name, getattr(cfg, f.name))
        tp = hints.get(f.name, Any)
        bound = (" > 0" if f.name in _POSITIVE_FIELDS else " >= 1" if f.name in _AT_LEAST_ONE_FIELDS else "")
        try:
            value = _coerce(value, tp)
        except TypeError:
            raise ValueError(f"{method}: {f.name} must be {_describe(tp)}{bound}, got {value!r}") from None
        if bound == " > 0" and isinstance(value, (int, float)) and not value > 0:
            raise ValueError(f"{method}: {f.name} must be {_describe(tp)} > 0, got {value!r}")
        if bound == " >= 1" and isinstance(value, int) and value < 1:
            raise ValueError(f"{method}: {f.name} must be {_describe(tp)} >= 1, got {value!r}")
        checked[f.name] = value
    return dataclasses.replace(cfg, **checked)


# ----------------------------------------------------------------------------- generated signatures
_Param = inspect.Parameter
_VAR_KINDS = (_Param.VAR_POSITIONAL, _Param.VAR_KEYWORD)


def _own_init_params(init: Any) -> list[inspect.Parameter]:
    """Named parameters of an ``__init__`` (not ``self``, ``*args``, ``**kwargs``)."""
    sig = inspect.signature(init)
    return [p for p in list(sig.parameters.values())[1:] if p.kind not in _VAR_KINDS]


def _constructor_signature(cls: type) -> inspect.Signature:
    """``(teacher, num_classes, image_size, config=None, *, <keywords of every __init__ in the MRO>,
    <Config fields with defaults>)``."""
    params: list[inspect.Parameter] = []
    seen: set[str] = set()
    for klass in reversed(cls.__mro__):
        for p in klass.__dict__.get("_init_params", ()):
            if p.name in seen:
                continue
            seen.add(p.name)
            if len(params) >= 4 and p.kind is not _Param.KEYWORD_ONLY:
                p = p.replace(kind=_Param.KEYWORD_ONLY)
            params.append(p)
    for f in dataclasses.fields(cls.Config):
        if f.name in seen:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else _Param.empty)
        params.append(_Param(f.name, _Param.KEYWORD_ONLY, default=default, annotation=f.type))
    return inspect.Signature(params, return_annotation=None)


# ----------------------------------------------------------------------------- teacher state
#: teacher -> [number of live synthesizers holding it, training flags, requires_grad flags] (before the first)
_HELD_TEACHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _hold_teacher(teacher: nn.Module) -> None:
    """Eval mode and frozen parameters; the caller's flags are saved by the first holder."""
    entry = _HELD_TEACHERS.get(teacher)
    if entry is None:
        entry = _HELD_TEACHERS[teacher] = [0, [m.training for m in teacher.modules()],
                                           [p.requires_grad for p in teacher.parameters()]]
    entry[0] += 1
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def _release_teacher(teacher: nn.Module) -> None:
    """Drop one hold; the last one restores the flags saved by :func:`_hold_teacher` (where still held)."""
    entry = _HELD_TEACHERS.get(teacher)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] > 0:
        return
    del _HELD_TEACHERS[teacher]
    # Undo only what is still in the held state (eval, frozen): a flag the caller has set back meanwhile stays.
    modules, params = list(teacher.modules()), list(teacher.parameters())
    if len(modules) == len(entry[1]):
        for m, flag in zip(modules, entry[1], strict=True):
            if not m.training:
                m.training = flag
    if len(params) == len(entry[2]):
        for p, flag in zip(params, entry[2], strict=True):
            if not p.requires_grad:
                p.requires_grad_(flag)


class Synthesizer:
    """Base class. Subclasses set ``Config`` and implement ``_synthesize``.

    Args:
        teacher: trained classifier; held in eval mode with frozen parameters while the synthesizer lives,
            the caller's flags restored by :meth:`close` / when the last synthesizer of it is dropped.
        num_classes: K; checked against the teacher's output width.
        image_size: (C, H, W) of the teacher's input.
        config: a ``Config`` instance; keyword ``overrides`` (its field names, or their aliases ``lr`` /
            ``lr_g``, ``T`` / ``temperature``) replace its fields; values are type-checked.
        batch_size: images per ``synthesize`` call.
        mean, std: the teacher's input normalization (per channel); images are synthesized in [0, 1].
        device: defaults to the teacher's device.
        backend: backend of the fused ops (``"auto"|"triton"|"cpp"|"torch"``).
        seed: seeds this synthesizer's ``torch.Generator`` (per-batch randomness is reproducible).
        student: optional student for adversarial / competition terms (never the teacher).
        compile: ``torch.compile`` mode for the per-step function (:data:`COMPILE_MODES`; ``"off"`` = eager,
            ``"reduce-overhead"`` gives CUDA graphs on a GPU).
        precision: ``"fp32" | "bf16" | "fp16"``: autocast dtype of the teacher and generator forward;
            BN statistics and losses are always computed in fp32.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[SynthesisConfig]] = SynthesisConfig
    needs_bn: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give ``cls`` (and its ``__init__``) the generated keyword signature (see the module docstring)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:  # an __init__ of its own, so that help(cls.__init__) shows this class's options
            def __init__(self: Any, *args: Any, **kw: Any) -> None:
                super(cls, self).__init__(*args, **kw)

            __init__.__qualname__ = f"{cls.__qualname__}.__init__"
            cls.__init__ = init = __init__  # type: ignore[misc]
            cls._init_params = ()
        else:
            cls._init_params = tuple(_own_init_params(init))
        sig = _constructor_signature(cls)
        cls.__signature__ = sig
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        init.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])

    def __init__(self, teacher: nn.Module, num_classes: int, image_size: Sequence[int],
                 config: SynthesisConfig | None = None, *, batch_size: int = 64,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 device: torch.device | str | None = None, backend: str = "auto", seed: int = 0,
                 student: nn.Module | None = None, compile: str = "off", precision: str = "fp32",
                 **overrides: Any) -> None:
        if len(tuple(image_size)) != 3:
            raise ValueError(f"image_size must be (C, H, W), got {tuple(image_size)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = resolve_config(self.name, self.Config, config, overrides)
        if compile not in COMPILE_MODES:
            raise ValueError(f"{self.name}: compile must be one of {COMPILE_MODES}, got {compile!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.compile_mode = compile
        self.precision = precision
        if not isinstance(teacher, nn.Module):
            raise ValueError(f"{self.name}: teacher must be an nn.Module, got {type(teacher).__name__}")
        _hold_teacher(teacher)  # eval + frozen while this synthesizer lives; the caller's flags come back after
        self._teacher_release = weakref.finalize(self, _release_teacher, teacher)
        self.teacher = teacher
        self.device = torch.device(device) if device is not None else _module_device(teacher)
        self.num_classes = int(num_classes)
        self.image_size = tuple(int(s) for s in image_size)
        self.batch_size = int(batch_size)
        self.backend = backend
        self.seed = int(seed)
        self.student = student
        if self.needs_bn and not has_batchnorm(teacher):
            raise ValueError(
                f"method {self.name!r} matches BatchNorm statistics but the teacher has no BatchNorm layers; "
                f"use one of: {', '.join(BN_FREE_METHODS)}")
        c = self.image_size[0]
        self.mean = _channel_vector(mean, c, "mean", self.device)
        self.std = _channel_vector(std, c, "std", self.device)
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError("std must be > 0 for every channel")
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.batches_done = 0
        self._check_num_classes()

    # ----- lifetime -----
    def close(self) -> None:
        """Remove this synthesizer's hooks from the teacher and give the teacher back: once no other
        synthesizer holds it, every submodule's ``training`` flag and every parameter's ``requires_grad`` are
        as before the first one was built. Idempotent; the synthesizer cannot synthesize afterwards."""
        for probe in self.__dict__.get("_probes", ()):
            probe.remove()
        release = self.__dict__.get("_teacher_release")
        if release is not None:
            release()
        self._closed = True

    def __enter__(self) -> Synthesizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- helpers for subclasses -----
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std with the teacher's input normalization (identity when none given)."""
        if self.mean is not None:
            x = x - self.mean.view(1, -1, 1, 1)
        if self.std is not None:
            x = x / self.std.view(1, -1, 1, 1)
        return x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.std is not None:
            x = x * self.std.view(1, -1, 1, 1)
        if self.mean is not None:
            x = x + self.mean.view(1, -1, 1, 1)
        return x

    def default_targets(self, n: int | None = None) -> torch.Tensor:
        """Balanced class targets, continuing round-robin across batches: (n,) long."""
        n = self.batch_size if n is None else n
        start = self.batches_done * self.batch_size
        return (torch.arange(start, start + n, device=self.device) % self.num_classes).long()

    def autocast(self) -> torch.autocast:
        """Autocast context for the teacher / generator forward at ``precision`` (disabled for fp32)."""
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def compile_step(self, fn: Any, fullgraph: bool = True) -> Any:
        """``fn`` compiled with ``torch.compile(mode=compile)``, or ``fn`` itself when ``compile="off"``.

        A step function may call ``torch.autograd.grad`` (loss and backward in one graph): it is traced with
        ``torch._dynamo.config.trace_autograd_ops`` on. Under ``"reduce-overhead"`` (CUDA graphs) a replay
        overwrites the previous call's outputs, which loss curves and optimizers still hold: each call then
        marks a new graph step and returns copies of its tensor outputs.
        """
        if self.compile_mode == "off":
            return fn
        compiled = torch.compile(_private_code(fn), mode=self.compile_mode, fullgraph=fullgraph, dynamic=False)
        cudagraphs = self.compile_mode == "reduce-overhead"

        def step(*args: Any, **kwargs: Any) -> Any:
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                out = compiled(*args, **kwargs)
            if cudagraphs:
                out = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
            return out

        return step

    # ----- persistent probes (hooks on the teacher that live as long as the synthesizer) -----
    def own_probe(self, probe: _P) -> _P:
        """Keep ``probe`` (a :class:`dfkd_fast.hooks.TeacherProbe` / ``FeatureProbe``) for this synthesizer's
        lifetime: paused now, capturing only inside :meth:`probes_capturing`, released by
        :meth:`release_captures`; its hooks are removed once the synthesizer is garbage-collected (at the next
        batch of any synthesizer, never from inside a collection, which may run in the middle of a forward or
        of a ``torch.compile`` trace over the teacher's hooks). Returns ``probe``."""
        remove_dead_probes()
        probe.pause()
        self.__dict__.setdefault("_probes", []).append(probe)
        weakref.finalize(self, _DEAD_PROBES.append, probe)
        return probe

    @contextlib.contextmanager
    def probes_capturing(self) -> Iterator[None]:
        """Every owned probe captures inside the block (one batch); their captured stats (and the autograd
        graph those keep alive) are dropped when it ends."""
        probes = self.__dict__.get("_probes", ())
        with contextlib.ExitStack() as stack:
            for probe in probes:
                stack.enter_context(probe.capturing())
                stack.callback(probe.clear)
            yield

    def release_captures(self) -> None:
        """Cut the owned probes' captured stats from the graph once a step's loss is assembled, before
        ``autograd.grad`` (needed under ``torch.compile``: see ``TeacherProbe.detach_captured``)."""
        if torch.compiler.is_compiling():
            for probe in self.__dict__.get("_probes", ()):
                probe.detach_captured()

    def read_losses(self, tracker: Any, hint: str = "lower the learning rate or the loss weights"
                    ) -> tuple[float, ...]:
        """The batch's loss curve from ``tracker`` (:class:`BestTracker`), read once; raises ``ValueError``
        naming the method, the batch and the first step (from 0) whose loss is NaN/Inf, with ``hint``."""
        losses = tracker.losses()
        for i, v in enumerate(losses):
            if not math.isfinite(v):
                raise ValueError(f"{self.name}: the loss became {v} at step {i} of batch {self.batches_done} "
                                 f"(steps counted from 0); {hint}")
        return losses

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, device=self.device)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=self.device)

    # ----- interface -----
    def synthesize(self, targets: torch.Tensor | None = None) -> SynthesisResult:
        """Synthesize one batch of ``batch_size`` images (for ``targets`` when given)."""
        if self.__dict__.get("_closed"):
            raise ValueError(f"{self.name}: this synthesizer was closed; build a new one to synthesize")
        if targets is not None:
            targets = torch.as_tensor(targets, device=self.device)
            if targets.dim() == 1 and targets.numel() and bool(((targets < 0) | (targets >= self.num_classes)).any()):
                raise ValueError(f"targets must be class indices in [0, {self.num_classes}), "
                                 f"got range [{int(targets.min())}, {int(targets.max())}]")
        remove_dead_probes()
        t0 = time.perf_counter()
        res = self._synthesize(targets)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        res = dataclasses.replace(res, seconds=time.perf_counter() - t0)
        self.batches_done += 1
        return res

    def _synthesize(self, targets: torch.Tensor | None) -> SynthesisResult:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: RNG state, batch counter (subclasses add their own state)."""
        return {"method": self.name, "batches_done": self.batches_done,
                "rng_state": self.generator.get_state(), "config": dataclasses.asdict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"state is for method {state.get('method')!r}, not {self.name!r}")
        self.batches_done = int(state["batches_done"])
        self.generator.set_state(state["rng_state"])

    # ----- multi-process hooks (dfkd_fast.comm; no-ops for one process) -----
    #: ``state_dict`` keys that are ONE model across ranks (broadcast from rank ``src`` by :meth:`share_state`).
    shared_state: ClassVar[tuple[str, ...]] = ()

    def setup_comm(self, group: Any = None) -> bool:
        """Install this method's collectives for the process ``group`` (default: the default group).

        Returns whether the method communicates while synthesizing; the run loop then keeps every rank in
        lockstep (the same number of ``synthesize`` calls). Default: nothing shared, returns False.
        """
        return False

    def share_state(self, src: int = 0, group: Any = None) -> None:
        """Load rank ``src``'s :attr:`shared_state` entries on every rank (every rank calls it; no-op for one
        process or a method that shares nothing)."""
        if not self.shared_state or comm.world_size(group) == 1:
            return
        is_src = comm.rank(group) == src
        full = self.state_dict() if is_src else None
        shared = {k: full[k] for k in self.shared_state} if full is not None else None
        shared = comm.broadcast_object(shared, src=src, group=group,
                                       device=self.device if self.device.type == "cuda" else None)
        if is_src:
            return
        state = self.state_dict()
        state.update(shared)
        self.load_state_dict(state)

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.normalize(images))

    def _check_num_classes(self) -> None:
        c, h, w = self.image_size
        with torch.no_grad():
            was = [m.training for m in self.teacher.modules()]
            out = self.teacher(torch.zeros(2, c, h, w, device=self.device))
            for m, t in zip(self.teacher.modules(), was, strict=False):
                m.train(t)
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise ValueError(f"the teacher outputs shape {tuple(out.shape)} but num_classes={self.num_classes}; "
                             "pass the teacher's number of classes")


_P = Any

Synthesizer._init_params = tuple(_own_init_params(Synthesizer.__init__))
Synthesizer.__signature__ = _constructor_signature(Synthesizer)


def _private_code(fn: Any) -> Any:
    """``fn`` with a code object of its own. Dynamo caches compiled graphs per code object (with a limit of
    recompiles each): every synthesizer compiles the same method (e.g. ``_step``), guarded on its own modules,
    so without a private copy the 9th synthesizer of a process would hit the recompile limit (and, with
    ``fullgraph=True``, fail). Bound methods stay bound to their instance."""
    func = getattr(fn, "__func__", fn)
    if not isinstance(func, types.FunctionType):
        return fn
    copy = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    self_ = getattr(fn, "__self__", None)
    return copy if self_ is None else types.MethodType(copy, self_)

#: probes of garbage-collected synthesizers; their hooks are removed at the next safe point
_DEAD_PROBES: list[Any] = []


def remove_dead_probes() -> None:
    """Remove the hooks of the probes of collected synthesizers (see :meth:`Synthesizer.own_probe`)."""
    while _DEAD_PROBES:
        _DEAD_PROBES.pop().remove()


def _module_device(m: nn.Module) -> torch.device:
    for p in m.parameters():
        return p.device
    return torch.device("cpu")


def _channel_vector(v: Sequence[float] | None, c: int, name: str, device: torch.device) -> torch.Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.repeat(c)
    if t.numel() != c:
        raise ValueError(f"{name} must have 1 or {c} values (one per image channel), got {t.numel()}")
    return t
