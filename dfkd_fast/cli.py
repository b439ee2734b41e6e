"""``dfkd-fast``: command-line interface (one function per subcommand, flags generated from dataclasses).

Subcommands live in :data:`SUBCOMMANDS`; add one with the :func:`subcommand` decorator::

    @subcommand("robustness", RobustnessConfig, help="...")
    def cmd_robustness(cfg: RobustnessConfig, ns: argparse.Namespace) -> int: ...

Its flags are generated from the config dataclass (``--field-name``; see :mod:`dfkd_fast.config`), plus
``--config FILE`` (YAML/JSON; command-line flags override it). ``synthesize`` also gets one flag per
hyper-parameter of every registered synthesis method (``--iterations``, ``--bn``, ``--lr-g`` ...); a flag
the chosen method does not have is an error. A user error (``ValueError``, ``OSError``, ``RuntimeError``,
``SyntaxError``, safetensors errors ...) ends the program with one line ``dfkd-fast: error: <reason>`` on
stderr and exit status 2; Ctrl-C with ``dfkd-fast: interrupted`` and status 130; any other exception (a bug)
with one line and status 1 (``DFKD_FAST_DEBUG=1`` shows the traceback instead). See :func:`main`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dfkd_fast.config import (
    DemoConfig,
    DistillConfig,
    ExportPngConfig,
    InspectConfig,
    SynthesizeConfig,
    load_yaml,
    merge_config,
    parse_floats,
    parse_image_size,
    parse_opts,
)

__all__ = ["SUBCOMMANDS", "Subcommand", "subcommand", "build_parser", "add_dataclass_arguments", "main",
           "all_flags"]

PROG = "dfkd-fast"
_METHOD_PREFIX = "method__"


class CLIError(ValueError):
    """A command-line usage error (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(message)


@dataclass
class Subcommand:
    """A registered subcommand: ``func(cfg, namespace) -> exit status``."""

    name: str
    func: Callable[[Any, argparse.Namespace], int]
    config: type | None
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, config: type | None = None, help: str = "",
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``func(cfg, ns) -> int`` as ``dfkd-fast <name>`` with flags generated from ``config``."""

    def deco(func: Callable[[Any, argparse.Namespace], int]) -> Callable[[Any, argparse.Namespace], int]:
        if name in SUBCOMMANDS and SUBCOMMANDS[name].func is not func:
            raise ValueError(f"subcommand {name!r} registered twice")
        SUBCOMMANDS[name] = Subcommand(name, func, config, help or (func.__doc__ or "").strip().split("\n")[0],
                                       add_arguments)
        return func

    return deco


# ----------------------------------------------------------------------------- flag generation
def _type_name(t: Any) -> str:
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).replace(" ", "")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field: ``--field-name`` (bool -> switch, list -> repeatable, else typed).

    Defaults are suppressed so that only flags actually given reach the namespace (they override the YAML
    file, which overrides the dataclass defaults).
    """
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        t = _type_name(f.type)
        helptext = f.metadata.get("help", "")
        default = None if f.default is dataclasses.MISSING else f.default
        if f.metadata.get("required"):
            helptext += " (required)"
        elif default not in (None, False):
            helptext += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"])
        if t.startswith("bool"):
            parser.add_argument(flag, action="store_true", **kw)
        elif t.startswith("list"):
            parser.add_argument(flag, action="append", metavar="KEY=VALUE", **kw)
        elif t.startswith("int"):
            parser.add_argument(flag, type=int, **kw)
        elif t.startswith("float"):
            parser.add_argument(flag, type=float, **kw)
        else:
            parser.add_argument(flag, type=str, **kw)


def _method_fields(reserved: set[str]) -> dict[str, list[tuple[str, Any, Any]]]:
    """Union of the hyper-parameters of all registered methods: name -> [(method, type, default)]."""
    import dfkd_fast.synthesis as synthesis

    out: dict[str, list[tuple[str, Any, Any]]] = {}
    for mname in synthesis.list_methods():
        for f in dataclasses.fields(synthesis.REGISTRY[mname].Config):
            if f.name in reserved:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out.setdefault(f.name, []).append((mname, f.type, default))
    return out


def _add_method_arguments(parser: argparse.ArgumentParser, command_config: type = SynthesizeConfig) -> None:
    """One flag per method hyper-parameter, except names the subcommand's own ``command_config`` (and
    :class:`SynthesizeConfig`) already uses; those stay settable with ``--opt key=value``."""
    reserved = ({f.name for f in dataclasses.fields(SynthesizeConfig)}
                | {f.name for f in dataclasses.fields(command_config)} | {"config"})
    group = parser.add_argument_group("method options (typed by the chosen --method; also --opt key=value)")
    for name, owners in sorted(_method_fields(reserved).items()):
        flags = ["--" + name.replace("_", "-")]
        if "_" in name:
            flags.append("--" + name)
        methods = ", ".join(f"{m}={d}" for m, _, d in owners)
        group.add_argument(*flags, dest=_METHOD_PREFIX + name, default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{_type_name(owners[0][1])}; defaults: {methods}")


def _method_options(ns: argparse.Namespace, method: str) -> dict[str, Any]:
    from dfkd_fast.runner import _method_class

    given = {k[len(_METHOD_PREFIX):]: v for k, v in vars(ns).items() if k.startswith(_METHOD_PREFIX)}
    if not given:
        return {}
    cls = _method_class(method)
    try:
        return parse_opts(cls.Config, given)
    except ValueError as e:
        raise ValueError(f"--method {method}: {e}") from None


def config_from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """Dataclass defaults <- YAML file (``--config``) <- flags given on the command line.

    For a command with a synthesis method (``synthesize``, ``distill --online``: a config with ``method`` and
    ``opt`` fields) the file's keys that are not fields of ``cls`` are the method's hyper-parameters (top
    level, beside ``method:``): they join the per-method flags in ``ns`` (a flag given on the command line
    wins) and are checked against the chosen method by :func:`_method_options`.
    """
    from dfkd_fast.config import split_method_options

    names = {f.name for f in dataclasses.fields(cls)}
    layers: list[dict[str, Any]] = []
    method_opts: dict[str, Any] = {}
    if getattr(ns, "config", None):
        data = load_yaml(ns.config)
        if {"method", "opt"} <= names:
            data, method_opts = split_method_options(data, cls)
            for k, v in method_opts.items():
                vars(ns).setdefault(_METHOD_PREFIX + k, v)
        layers.append(data)
    layers.append({k: v for k, v in vars(ns).items() if k in names})
    cfg = merge_config(cls, *layers)
    if method_opts and getattr(cfg, "method", None) is None:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, method_opts))} in {ns.config}; known: "
                         f"{', '.join(sorted(names))} (method hyper-parameters need method:)")
    return cfg


def format_config(cmd_name: str, cfg: Any, ns: argparse.Namespace) -> str:
    """The fully merged configuration of a subcommand as YAML (``--print-config``), loadable by ``--config``.

    With a synthesis method (``synthesize``, ``distill --online``) every hyper-parameter of the chosen method
    follows at the top level (its defaults, the file's values, the flags and ``--opt`` merged and
    type-checked), and ``opt`` is emptied into them.
    """
    data = dataclasses.asdict(cfg)
    if getattr(cfg, "method", None) is not None and hasattr(cfg, "opt"):
        from dfkd_fast.runner import _method_class
        from dfkd_fast.synthesis.base import resolve_config

        mcls = _method_class(cfg.method)
        opts = _method_options(ns, cfg.method)
        opts.update(parse_opts(mcls.Config, cfg.opt))
        method_cfg = dataclasses.asdict(resolve_config(mcls.name, mcls.Config, None, opts))
        # a hyper-parameter named like a field of the command itself (distill's lr, warmup ...) stays in opt
        data["opt"] = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                       for k, v in method_cfg.items() if k in data and k in opts]
        data.update({k: v for k, v in method_cfg.items() if k not in data})

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    data = {k: plain(v) for k, v in data.items()}
    header = f"# dfkd-fast {cmd_name}: merged configuration (defaults <- --config file <- command-line flags)\n"
    try:
        import yaml
    except ImportError:  # JSON is valid YAML
        import json

        return header + json.dumps(data, indent=2)
    lines = [f"{k}: {yaml.safe_dump(v, default_flow_style=True).strip()}" if isinstance(v, list)
             else yaml.safe_dump({k: v}, default_flow_style=False).strip() for k, v in data.items()]
    return header + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog=PROG, description="Fast data-free knowledge distillation.")
    from dfkd_fast._version import VersionAction

    parser.add_argument("--version", action=VersionAction)  # "dfkd-fast X (torch Y, extension built|not built)"
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd in SUBCOMMANDS.items():
        sp = subs.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.config is not None:
            sp.add_argument("--config", dest="config", default=None, metavar="FILE",
                            help="YAML/JSON file with option: value pairs (flags override it)")
            sp.add_argument("--print-config", dest="print_config", action="store_true",
                            help="print the fully merged configuration as YAML and exit")
            add_dataclass_arguments(sp, cmd.config)
        if cmd.add_arguments is not None:
            cmd.add_arguments(sp)
    return parser


def all_flags(parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Every option string of every subcommand (used to check none is a prefix of a torchrun option)."""
    parser = parser or build_parser()
    flags: list[str] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public API for this
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sp in action.choices.values():
                for a in sp._actions:  # noqa: SLF001
                    flags += [s for s in a.option_strings if s.startswith("--")]
    return sorted(set(flags))


# ----------------------------------------------------------------------------- subcommands
@subcommand("synthesize", SynthesizeConfig, help="synthesize a transfer set from a teacher",
            add_arguments=_add_method_arguments)
def cmd_synthesize(cfg: SynthesizeConfig, ns: argparse.Namespace) -> int:
    from dfkd_fast.runner import synthesize_from_config

    summary = synthesize_from_config(cfg, _method_options(ns, cfg.method), progress=True)
    if summary.extra.get("distributed", {}).get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    print(summary.format())
    print(f"transfer set: {summary.out}" + (f" | preview: {summary.preview}" if summary.preview else ""))
    return 0


@subcommand("info", None, help="backends per op, versions, build info, extension status")
def cmd_info(cfg: None, ns: argparse.Namespace) -> int:
    from dfkd_fast.info import collect_info, format_info

    print(format_info(collect_info()))
    return 0


@subcommand("export-png", ExportPngConfig, help="write a transfer set out as a folder of PNG images")
def cmd_export_png(cfg: ExportPngConfig, ns: argparse.Namespace) -> int:
    from dfkd_fast.transfer_set import export_png

    if not os.path.isdir(cfg.transfer_set):
        raise FileNotFoundError(f"--transfer-set: directory {cfg.transfer_set!r} not found")
    n = export_png(cfg.transfer_set, cfg.out, overwrite=cfg.overwrite)
    print(f"exported {n} images of {cfg.transfer_set} -> {cfg.out} (one folder per class, labels.csv, logits.npy)")
    return 0


def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("transfer_set", nargs="?", default=argparse.SUPPRESS, metavar="DIR",
                        help="transfer set directory (same as --transfer-set)")


@subcommand("inspect", InspectConfig, help="data-free health report of a transfer set: text, health.json, health.png",
            add_arguments=_add_inspect_arguments)
def cmd_inspect(cfg: InspectConfig, ns: argparse.Namespace) -> int:
    from dfkd_fast.health import format_health, transfer_set_health
    from dfkd_fast.runner import load_teacher, resolve_device

    if not os.path.isfile(os.path.join(cfg.transfer_set, "manifest.json")):
        raise FileNotFoundError(f"DIR / --transfer-set: {cfg.transfer_set!r} has no manifest.json (not a finished "
                                "transfer set)")
    if cfg.max_images < 2:
        raise ValueError(f"--max-images must be >= 2, got {cfg.max_images}")
    from dfkd_fast.tasks.distill.offline import check_transfer_set
    from dfkd_fast.transfer_set import TransferSet

    image_size = parse_image_size(cfg.image_size)
    check_transfer_set(TransferSet(cfg.transfer_set).manifest, num_classes=cfg.num_classes, image_size=image_size,
                       where=f"--transfer-set {cfg.transfer_set}")
    mean, std = parse_floats(cfg.mean, "mean"), parse_floats(cfg.std, "std")
    teacher = load_teacher(cfg.teacher, cfg.weights, cfg.num_classes, image_size, resolve_device(cfg.device),
                           mean=mean, std=std)
    out = cfg.out or cfg.transfer_set
    report = transfer_set_health(cfg.transfer_set, teacher, mean=mean, std=std, max_images=cfg.max_images,
                                 seed=cfg.seed, out=out, figure=True)
    print(format_health(report))
    print(f"outputs: {os.path.join(out, 'health.json')} | {os.path.join(out, 'health.png')}")
    return 0


def _test_set(name: str | None, image_size: tuple[int, int, int]):
    """``--test-set``: mnist5k / digits / none, an ImageFolder directory or a .pt/.safetensors file
    (:func:`dfkd_fast.datasets.load_test_set`)."""
    from dfkd_fast.datasets import load_test_set

    return load_test_set(name, image_size)


def _add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    """``distill --online``: every method hyper-parameter as a flag, minus the names ``distill`` has itself
    (``--lr`` is the student's, ``--warmup`` the online warm-up: use ``--opt lr=...`` for a pixel method's lr)."""
    _add_method_arguments(parser, DistillConfig)


def _cmd_distill_online(cfg: DistillConfig, ns: argparse.Namespace) -> int:
    """``distill --online --method M``: synthesize while distilling, each method on its paper's schedule
    (:func:`dfkd_fast.tasks.distill.distill_online`)."""
    if cfg.method is None:
        raise ValueError("--online needs --method (a synthesis method: see `dfkd-fast info`)")
    if cfg.transfer_set is not None:
        raise ValueError("--online synthesizes its own transfer set (written to --out/transfer_set); drop "
                         "--transfer-set")
    if cfg.kd_steps < 1 or cfg.ep_steps < cfg.kd_steps:
        raise ValueError(f"--online needs --kd-steps >= 1 and --ep-steps >= --kd-steps (an epoch is "
                         f"ep_steps // kd_steps rounds), got --kd-steps {cfg.kd_steps} --ep-steps {cfg.ep_steps}")
    if cfg.epochs < 1 or (cfg.warmup is not None and not 0 <= cfg.warmup <= cfg.epochs):
        raise ValueError(f"--online needs --epochs >= 1 and --warmup <= --epochs, got --epochs {cfg.epochs} "
                         f"--warmup {cfg.warmup}")
    if cfg.batch_size < 1 or (cfg.synthesis_batch_size is not None and cfg.synthesis_batch_size < 1):
        raise ValueError("--batch-size and --synthesis-batch-size must be >= 1")
    if cfg.pool_capacity is not None and cfg.pool_capacity < 1:
        raise ValueError(f"--pool-capacity must be >= 1 (or left out: keep every image), got {cfg.pool_capacity}")
    if cfg.student_weights is not None and not os.path.isfile(cfg.student_weights):
        raise FileNotFoundError(f"--student-weights: file {cfg.student_weights!r} not found")
    image_size = parse_image_size(cfg.image_size)

    import torch

    import dfkd_fast.synthesis as synthesis
    from dfkd_fast.runner import _method_class, load_reference_images, load_student, load_teacher, resolve_device
    from dfkd_fast.tasks.distill import distill_online

    cls = _method_class(cfg.method)
    opts = _method_options(ns, cfg.method)
    opts.update(parse_opts(cls.Config, cfg.opt))
    if "warmup" in opts:
        raise ValueError(f"--opt warmup: the online warm-up is --warmup (epochs), which also sets {cls.name}'s")
    extra: dict[str, Any] = {}
    if cls.name == "impression_space":
        if cfg.reference_images is None:
            raise ValueError("--method impression_space synthesizes the impression of given images: pass "
                             "--reference-images")
        extra["reference_images"] = load_reference_images(cfg.reference_images, image_size)
    elif cfg.reference_images is not None:
        raise ValueError(f"--reference-images is an option of impression_space, not of {cfg.method!r}")
    mean, std = parse_floats(cfg.mean, "mean"), parse_floats(cfg.std, "std")
    test_data = _test_set(cfg.test_set, image_size)
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.weights, cfg.num_classes, image_size, device,
                           mean=parse_floats(cfg.mean, "mean"), std=parse_floats(cfg.std, "std"))
    torch.manual_seed(cfg.seed)  # before the student is built: --seed fixes its initialization too
    student = load_student(cfg.student, cfg.student_weights, cfg.num_classes, image_size, device)
    if "reference_images" in extra:
        extra["reference_images"] = extra["reference_images"].to(device)
    rpe = cfg.ep_steps // cfg.kd_steps
    synth = synthesis.build_synthesizer(cfg.method, teacher, cfg.num_classes, image_size,
                                        batch_size=cfg.synthesis_batch_size or cfg.batch_size, mean=mean, std=std,
                                        device=device, backend=cfg.backend, seed=cfg.seed, student=student,
                                        **opts, **extra)
    res = distill_online(student, teacher, synth, cfg.epochs * rpe, cfg.kd_steps, rounds_per_epoch=rpe,
                         lr=cfg.lr, T=cfg.temperature, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                         schedule=cfg.schedule, grad_clip=cfg.grad_clip,
                         warmup_rounds=None if cfg.warmup is None else cfg.warmup * rpe,
                         pool_capacity=cfg.pool_capacity,
                         augment=cfg.augment, mean=mean, std=std, test_data=test_data, out_dir=cfg.out,
                         save_pool=True, resume=cfg.resume, backend=cfg.backend, seed=cfg.seed, progress=True)
    acc = (f"{100 * res.final_acc:.2f}% (best {100 * res.best_acc:.2f}%)" if res.test_acc
           else "n/a (no --test-set)")
    import json

    with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
        synthesized = json.loads(f.read().splitlines()[-1])["images"]  # incl. DAFL/ZSKT/DFQ's fresh samples
    ips = synthesized / res.synth_seconds if res.synth_seconds > 0 else float("nan")
    print(f"online {synth.name}: {res.epochs} epochs, {synthesized} images synthesized ({ips:.1f} images/s, "
          f"synthesis {res.synth_seconds:.1f} s), pool {res.images}, end to end {res.seconds:.1f} s | final KD loss "
          f"{res.train_loss[-1] if res.train_loss else float('nan'):.4f} | test accuracy {acc}")
    print(f"outputs: {cfg.out} (student.safetensors, checkpoint.pt, metrics.jsonl, curves.png, transfer_set/)")
    return 0


@subcommand("distill", DistillConfig, help="train a student by KD from the teacher on a transfer set, or with "
            "--online --method M while synthesizing it", add_arguments=_add_distill_arguments)
def cmd_distill(cfg: DistillConfig, ns: argparse.Namespace) -> int:
    if cfg.online:
        return _cmd_distill_online(cfg, ns)
    if cfg.transfer_set is None:
        raise ValueError("the argument --transfer-set is required (or pass --online --method M to synthesize "
                         "while distilling)")
    image_size = parse_image_size(cfg.image_size)
    if not os.path.isdir(cfg.transfer_set):
        raise FileNotFoundError(f"--transfer-set: directory {cfg.transfer_set!r} not found")
    if cfg.student_weights is not None and not os.path.isfile(cfg.student_weights):
        raise FileNotFoundError(f"--student-weights: file {cfg.student_weights!r} not found")

    import warnings

    import torch

    from dfkd_fast.runner import load_student, load_teacher, resolve_device
    from dfkd_fast.tasks.distill import distill
    from dfkd_fast.tasks.distill.offline import check_transfer_set
    from dfkd_fast.transfer_set import TransferSet

    ts = TransferSet(cfg.transfer_set)
    check_transfer_set(ts.manifest, num_classes=cfg.num_classes, image_size=image_size,
                       where=f"--transfer-set {cfg.transfer_set}")
    test_data = _test_set(cfg.test_set, image_size)
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.weights, cfg.num_classes, image_size, device,
                           mean=parse_floats(cfg.mean, "mean"), std=parse_floats(cfg.std, "std"))
    torch.manual_seed(cfg.seed)  # before the student is built: --seed fixes its initialization too
    student = load_student(cfg.student, cfg.student_weights, cfg.num_classes, image_size, device)
    with warnings.catch_warnings():  # library warnings (--allow-teacher-mismatch) as one line each
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = lambda msg, *a, **k: print(f"{PROG}: warning: {msg}", file=sys.stderr)
        res = distill(student, teacher, ts, epochs=cfg.epochs, lr=cfg.lr, T=cfg.temperature,
                      batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                      grad_clip=cfg.grad_clip, mean=parse_floats(cfg.mean, "mean"),
                      std=parse_floats(cfg.std, "std"), augment=cfg.augment,
                      test_data=test_data, num_classes=cfg.num_classes, out_dir=cfg.out, resume=cfg.resume,
                      device=device, backend=cfg.backend, seed=cfg.seed,
                      allow_teacher_mismatch=cfg.allow_teacher_mismatch)
    acc = (f"{100 * res.final_acc:.2f}% (best {100 * res.best_acc:.2f}%, teacher {100 * res.teacher_acc:.2f}%)"
           if res.test_acc else "n/a (no --test-set)")
    print(f"student trained on {res.images} images for {res.epochs} epochs in {res.seconds:.1f} s | "
          f"final KD loss {res.train_loss[-1] if res.train_loss else float('nan'):.4f} | test accuracy {acc}")
    print(f"outputs: {cfg.out} (student.safetensors, checkpoint.pt, metrics.jsonl, curves.png)")
    return 0


@subcommand("demo", DemoConfig, help="MNIST-5k: teacher -> Data Impressions -> LeNet-5-half student, on a CPU")
def cmd_demo(cfg: DemoConfig, ns: argparse.Namespace) -> int:
    from dfkd_fast.demo import run_demo

    result = run_demo(cfg)
    print(result.table())
    return 0


# ---- task subcommands (engineer "tasks"): configs and runners in dfkd_fast/tasks/commands.py ----
from dfkd_fast.tasks.commands import (  # noqa: E402
    ClassIncrementalConfig,
    ImpressionConfig,
    RobustDistillConfig,
    RobustnessConfig,
    UAPConfig,
    UDAConfig,
)


def _task_command(name: str, config: type, runner: str, help: str) -> None:
    def cmd(cfg: Any, ns: argparse.Namespace) -> int:
        from dfkd_fast.tasks import commands

        print(getattr(commands, runner)(cfg))
        return 0

    cmd.__name__ = f"cmd_{name.replace('-', '_')}"
    subcommand(name, config, help=help)(cmd)


_task_command("robustness", RobustnessConfig, "run_robustness", "FGSM / iFGSM / PGD robustness (+ PGD training)")
_task_command("robust-distill", RobustDistillConfig, "run_robust_distill", "Data Impressions robustness (Table 4)")
_task_command("uap", UAPConfig, "run_uap", "data-free universal adversarial perturbation from Data Impressions")
_task_command("uda", UDAConfig, "run_uda", "source-free domain adaptation (ADDA + Data Impressions)")
_task_command("class-incremental", ClassIncrementalConfig, "run_class_incremental",
              "exemplar-free class-incremental learning: fine-tuning, LwF, Data Impressions")
_task_command("impression", ImpressionConfig, "run_impression",
              "Impression Space: unpaired translation, data selection, one-shot synthesis")
# ---- end task subcommands ----


# ----------------------------------------------------------------------------- entry point
def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    elif isinstance(e, SyntaxError) and e.filename:
        msg = f"{e.msg} ({e.filename}, line {e.lineno})"
    return " ".join(msg.split())


def _is_user_error(e: BaseException) -> bool:
    """Errors that describe bad input or a failing environment (reported as one line, exit 2)."""
    if isinstance(e, (ValueError, OSError, RuntimeError, ImportError, KeyError, SyntaxError)):
        return True
    return type(e).__name__ == "SafetensorError"  # safetensors' error type is not an OSError


class _Interrupts:
    """SIGINT while ``main`` runs: remembered and raised as ``KeyboardInterrupt``; should a library swallow it
    (``except BaseException``), it is raised again after every 20 ms of CPU time (``ITIMER_VIRTUAL`` /
    SIGVTALRM, where available) until ``main`` handles it, so a Ctrl-C is never ignored."""

    RETRY_S = 0.02

    def __init__(self) -> None:
        self.seen = False
        self.handled = False
        self.previous: dict[int, Any] = {}

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.seen = True
        self._arm()
        raise KeyboardInterrupt

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self.seen and not self.handled:
            self._arm()
            raise KeyboardInterrupt

    def _arm(self) -> None:
        import signal

        if hasattr(signal, "setitimer") and signal.SIGVTALRM in self.previous:
            signal.setitimer(signal.ITIMER_VIRTUAL, self.RETRY_S)

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            if hasattr(signal, "setitimer") and signal.getsignal(signal.SIGVTALRM) in (signal.SIG_DFL, None):
                self.previous[signal.SIGVTALRM] = signal.signal(signal.SIGVTALRM, self._on_alarm)
        except (ValueError, OSError):  # e.g. an embedded interpreter without signal support
            pass

    def restore(self) -> None:
        """Stop the retries and put the previous handlers back (idempotent)."""
        import signal

        self.handled = True
        if signal.SIGVTALRM in self.previous:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        for sig, old in self.previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self.previous.clear()


def _end_progress_bars() -> None:
    """Close the progress bars still on screen, so that an error starts on a line of its own."""
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is None:
        return
    for bar in list(getattr(tqdm_mod.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - never let cosmetics hide the real error
            pass
    sys.stdout.flush()


def _report(line: str) -> None:
    _end_progress_bars()
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dfkd-fast``; returns the exit status.

    User errors (``ValueError``, ``OSError``, ``RuntimeError``, ``ImportError``, ``KeyError``, ``SyntaxError``,
    safetensors errors): one line ``dfkd-fast: error: ...`` on stderr, status 2. Ctrl-C: one line
    ``dfkd-fast: interrupted``, status 130 (also when a library swallowed the ``KeyboardInterrupt``). Any other
    exception is an internal bug: one line with a hint, status 1. ``DFKD_FAST_DEBUG=1`` re-raises instead
    (full traceback). Open progress bars are closed first, so the line starts on a line of its own.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("DFKD_FAST_DEBUG", "0") == "1"
    interrupts = _Interrupts()
    interrupts.install()
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 2
        ns = parser.parse_args(argv)
        if ns.command is None:
            raise CLIError("choose a command: " + ", ".join(SUBCOMMANDS))
        cmd = SUBCOMMANDS[ns.command]
        cfg = config_from_namespace(cmd.config, ns) if cmd.config is not None else None
        if getattr(ns, "print_config", False):  # --print-config: the merged configuration, nothing run
            print(format_config(cmd.name, cfg, ns))
            return 0
        rc = int(cmd.func(cfg, ns) or 0)
        if interrupts.seen:  # a library caught the KeyboardInterrupt: the run must not pass as complete
            raise KeyboardInterrupt
        return rc
    except KeyboardInterrupt:
        interrupts.restore()
        if debug:
            raise
        _report("interrupted")
        return 130
    except Exception as e:
        interrupts.restore()
        if debug:
            raise
        if interrupts.seen:  # e.g. an ImportError "initialization failed" caused by the Ctrl-C
            _report("interrupted")
            return 130
        if _is_user_error(e):
            _report(f"error: {_one_line(e)}")
            return 2
        _report(f"error: internal error ({type(e).__name__}: {_one_line(e)}); please report it, and rerun with "
                "DFKD_FAST_DEBUG=1 for the traceback")
        return 1
    finally:
        interrupts.restore()


if __name__ == "__main__":
    raise SystemExit(main())
