"""``dfkd-fast``: command-line interface (one function per subcommand, flags generated from dataclasses).

Subcommands live in :data:`SUBCOMMANDS`; add one with the :func:`subcommand` decorator::

    @subcommand("robustness", RobustnessConfig, help="...")
    def cmd_robustness(cfg: RobustnessConfig, ns: argparse.Namespace) -> int: ...

Its flags are generated from the config dataclass (``--field-name``; see :mod:`dfkd_fast.config`), plus
``--config FILE`` (YAML/JSON; command-line flags override it). ``synthesize`` also gets one flag per
hyper-parameter of every registered synthesis method (``--iterations``, ``--bn``, ``--lr-g`` ...); a flag
the chosen method does not have is an error. Any ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError``
ends the program with one line ``dfkd-fast: error: <reason>`` on stderr and exit status 2
(``DFKD_FAST_DEBUG=1`` shows the traceback instead).
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


def _add_method_arguments(parser: argparse.ArgumentParser) -> None:
    reserved = {f.name for f in dataclasses.fields(SynthesizeConfig)} | {"config"}
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
    """Dataclass defaults <- YAML file (``--config``) <- flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    layers: list[dict[str, Any]] = []
    if getattr(ns, "config", None):
        layers.append(load_yaml(ns.config))
    layers.append({k: v for k, v in vars(ns).items() if k in names})
    return merge_config(cls, *layers)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = _Parser(prog=PROG, description="Fast data-free knowledge distillation.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, cmd in SUBCOMMANDS.items():
        sp = subs.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.config is not None:
            sp.add_argument("--config", dest="config", default=None, metavar="FILE",
                            help="YAML/JSON file with option: value pairs (flags override it)")
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
    export_png(cfg.transfer_set, cfg.out)
    print(f"exported {cfg.transfer_set} -> {cfg.out}")
    return 0


def _test_set(name: str | None, image_size: tuple[int, int, int]):
    if name is None or name == "none":
        return None
    from dfkd_fast import datasets

    if name not in ("mnist5k", "digits"):
        raise ValueError(f"--test-set must be mnist5k, digits or none, got {name!r}")
    x, y = getattr(datasets, name)("test", image_size=image_size[1])
    if x.shape[1] != image_size[0]:
        x = x.expand(-1, image_size[0], -1, -1).contiguous()
    return x, y


@subcommand("distill", DistillConfig, help="train a student by KD from the teacher on a transfer set")
def cmd_distill(cfg: DistillConfig, ns: argparse.Namespace) -> int:
    image_size = parse_image_size(cfg.image_size)
    if not os.path.isdir(cfg.transfer_set):
        raise FileNotFoundError(f"--transfer-set: directory {cfg.transfer_set!r} not found")
    if cfg.student_weights is not None and not os.path.isfile(cfg.student_weights):
        raise FileNotFoundError(f"--student-weights: file {cfg.student_weights!r} not found")

    import torch

    from dfkd_fast.models import load_model
    from dfkd_fast.runner import load_teacher, resolve_device
    from dfkd_fast.tasks.distill import distill
    from dfkd_fast.transfer_set import TransferSet

    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, cfg.weights, cfg.num_classes, image_size, device)
    student = load_model(cfg.student, weights=cfg.student_weights, num_classes=cfg.num_classes,
                         in_channels=image_size[0], image_size=image_size[1]).to(device)
    torch.manual_seed(cfg.seed)
    ts = TransferSet(cfg.transfer_set)
    res = distill(student, teacher, ts, epochs=cfg.epochs, lr=cfg.lr, T=cfg.temperature, batch_size=cfg.batch_size,
                  weight_decay=cfg.weight_decay, schedule=cfg.schedule, mean=parse_floats(cfg.mean, "mean"),
                  std=parse_floats(cfg.std, "std"), augment=cfg.augment, test_data=_test_set(cfg.test_set, image_size),
                  num_classes=cfg.num_classes, out_dir=cfg.out, resume=cfg.resume, device=device,
                  backend=cfg.backend, seed=cfg.seed)
    acc = f"{100 * res.final_acc:.2f}% (best {100 * res.best_acc:.2f}%)" if res.test_acc else "n/a (no --test-set)"
    print(f"student trained on {res.images} images for {res.epochs} epochs in {res.seconds:.1f} s | "
          f"final KD loss {res.train_loss[-1] if res.train_loss else float('nan'):.4f} | test accuracy {acc}")
    print(f"outputs: {cfg.out} (student.pt, checkpoint.pt, curves.png)")
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
    return " ".join(msg.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dfkd-fast``; returns the exit status (errors: one line on stderr, status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
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
        return int(cmd.func(cfg, ns) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError, KeyError) as e:
        if os.environ.get("DFKD_FAST_DEBUG", "0") == "1":
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
