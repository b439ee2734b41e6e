"""Ahead-of-time compilation of every Triton kernel specialization, for a GPU that is not present.

Each kernel module lists, next to its launchers, the specializations the launchers can pick
(``aot_specializations()``: dtypes, block / warp configurations, constexpr flags), built from the SAME
config tables the launchers use, so the list cannot drift from what runs. This module compiles them with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` -- PTX and a cubin from Triton's
bundled ``ptxas``; no GPU and no CUDA driver needed -- and reads the resource usage of the cubin:
registers per thread, spill stores / loads (bytes), local memory and shared memory.

What is compiled per specialization: integer arguments as generic ``i32`` (no value specialization) and
pointer arguments with 16-byte alignment (``tt.divisibility=16``, what the JIT infers for any tensor that
PyTorch allocated). At run time the JIT may additionally fold unit strides into constants; those variants
only remove arithmetic, they do not change tiles or warps.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable

from . import HAS_TRITON, TRITON_IMPORT_ERROR

TORCH_TO_TRITON = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
                   "int8": "i8", "int32": "i32", "int64": "i64"}


@dataclasses.dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: argument types, constexpr values and launch options.

    ``hot`` marks the kernels on the per-step path of a synthesis run (they must not spill registers).
    ``label`` is a short human-readable key such as ``"x=bf16 BLOCK_C=4 BLOCK_S=512 w4"``.
    """

    kernel: str
    label: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    hot: bool = True
    num_stages: int = 3

    @property
    def key(self) -> str:
        return f"{self.kernel}[{self.label}]"


@dataclasses.dataclass(frozen=True)
class Resources:
    """Resource usage of one compiled cubin, as reported by ``ptxas -v`` for the exact PTX Triton produced."""

    arch: int
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame (local memory) per thread
    shared: int  # bytes of shared memory per block (Triton's allocation)
    ptx_lines: int
    seconds: float

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def signature(fn, types: dict[str, str] | None = None, constexprs: dict | None = None,
              default: str = "i32") -> tuple[dict[str, str], dict]:
    """(signature, constexprs) for ``ASTSource``: named types, constexprs, and ``default`` for the rest.

    Raises if a name is not an argument of ``fn`` or a ``tl.constexpr`` argument has no value, so a table that
    drifts from the kernel's parameter list fails loudly.
    """
    types = dict(types or {})
    constexprs = dict(constexprs or {})
    params = inspect.signature(getattr(fn, "fn", fn)).parameters  # JITFunction or the interpreter's wrapper
    names = list(params)
    unknown = [n for n in [*types, *constexprs] if n not in names]
    if unknown:
        raise KeyError(f"{fn.__name__}: no argument(s) {unknown}; arguments are {names}")
    sig = {}
    for name in names:
        is_constexpr = "constexpr" in str(params[name].annotation)
        if name in constexprs:
            sig[name] = "constexpr"
        elif is_constexpr:
            raise KeyError(f"{fn.__name__}: constexpr argument {name!r} needs a value")
        else:
            sig[name] = types.get(name, default)
    return sig, constexprs


def triton_dtype(dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (also accepts the Triton name itself)."""
    name = str(dtype).replace("torch.", "")
    return TORCH_TO_TRITON.get(name, name)


def all_specializations(modules: Iterable[str] | None = None) -> list[Specialization]:
    """Every specialization of every kernel module (``bn_stats``, ``soft_ce``, ``info_nce``, ...)."""
    import importlib

    names = list(modules) if modules is not None else list(KERNEL_MODULES)
    out: list[Specialization] = []
    for name in names:
        mod = importlib.import_module(f"{__package__}.{name}")
        out.extend(mod.aot_specializations())
    keys = [s.key for s in out]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise AssertionError(f"duplicate specializations: {sorted(dup)}")
    return out


KERNEL_MODULES = ("bn_stats", "soft_ce", "info_nce", "crop_flip", "dirichlet")


def ptxas_path(arch: int) -> str | None:
    """Path of the ``ptxas`` that Triton would use for ``arch``, or None when it is missing."""
    if not HAS_TRITON:
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - any failure to locate the tool means "missing"; the reason is below
        return None
    return path if path and os.path.exists(path) else None


def unavailable_reason(arch: int = 90) -> str | None:
    """Why AOT compilation cannot run here (None when it can)."""
    if not HAS_TRITON:
        return f"Triton is not importable ({TRITON_IMPORT_ERROR})"
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as e:
        return f"Triton's NVIDIA backend is missing ({e})"
    if ptxas_path(arch) is None:
        return f"Triton's bundled ptxas for sm_{arch} is missing (set TRITON_PTXAS_PATH or reinstall triton)"
    return None


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Run the bundled ptxas with Triton's flags plus ``-v`` and parse registers / stack / spills."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas_path(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None and key == "registers":
            raise RuntimeError(f"could not read the register count from ptxas -v:\n{log}")
        out[key] = int(m.group(1)) if m else 0
    return out


def _cached_usage(compiled, ptx: str, arch: int) -> dict[str, int]:
    """:func:`_ptxas_usage`, memoized next to the cubin in Triton's cache directory (same key)."""
    from triton.runtime.cache import get_cache_manager

    name = "dfkd_fast_ptxas_usage.json"
    try:
        cache = get_cache_manager(compiled.metadata.hash)
        path = cache.get_file(name)
    except Exception:  # noqa: BLE001 - an unusable cache only costs a ptxas run
        cache, path = None, None
    if path is not None:
        with open(path) as f:
            return json.load(f)
    usage = _ptxas_usage(ptx, arch)
    if cache is not None:
        cache.put(json.dumps(usage), name, binary=False)
    return usage


def compile_one(spec: Specialization, arch: int = 90, usage: bool = True) -> tuple[object, Resources | None]:
    """Compile one specialization for ``sm_<arch>``; returns (CompiledKernel, Resources or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(spec.signature.values()) if ty.startswith("*")}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    if not usage:
        return compiled, None
    ptx = compiled.asm["ptx"]
    u = _cached_usage(compiled, ptx, arch)
    res = Resources(arch=arch, registers=u["registers"], spill_stores=u["spill_stores"],
                    spill_loads=u["spill_loads"], stack=u["stack"], shared=int(compiled.metadata.shared),
                    ptx_lines=ptx.count("\n"), seconds=time.perf_counter() - t0)
    return compiled, res


def compile_all(specs: Iterable[Specialization], arch: int = 90,
                progress: Callable[[Specialization, Resources | None, BaseException | None], None] | None = None,
                ) -> list[tuple[Specialization, Resources | None, BaseException | None]]:
    """Compile each specialization; a failure is recorded (with its exception) and the loop goes on."""
    results = []
    for spec in specs:
        try:
            _, res = compile_one(spec, arch)
            err = None
        except Exception as e:  # noqa: BLE001 - reported per specialization by the caller
            res, err = None, e
        results.append((spec, res, err))
        if progress is not None:
            progress(spec, res, err)
    return results


def covering_subset(specs: Iterable[Specialization]) -> list[Specialization]:
    """A small subset in which, for every kernel, each label token (each dtype, each block / warp value, each
    flag value) appears at least once: a greedy cover, in the original order."""
    specs = list(specs)
    chosen: list[Specialization] = []
    for kernel in dict.fromkeys(s.kernel for s in specs):
        mine = [s for s in specs if s.kernel == kernel]
        missing = {tok for s in mine for tok in s.label.split()}
        while missing:
            best = max(mine, key=lambda s: len(missing & set(s.label.split())))
            chosen.append(best)
            missing -= set(best.label.split())
    order = {id(s): i for i, s in enumerate(specs)}
    return sorted(chosen, key=lambda s: order[id(s)])


def result_record(spec: Specialization, res: Resources | None, err: BaseException | None) -> dict:
    """One JSON-able row: kernel, specialization, arch and resources (or the error)."""
    row = {"kernel": spec.kernel, "specialization": spec.label, "num_warps": spec.num_warps, "hot": spec.hot}
    if res is not None:
        row.update(dataclasses.asdict(res), spills=res.spills)
    if err is not None:
        row["error"] = f"{type(err).__name__}: {str(err)[-2000:]}"
    return row


def _compile_indices(args: tuple[tuple[str, ...], bool, int, list[int]]) -> list[tuple[int, dict]]:
    """Worker of ``--jobs``: compile the specializations at ``indices`` (re-enumerated in the worker)."""
    modules, subset, arch, indices = args
    specs = all_specializations(modules)
    if subset:
        specs = covering_subset(specs)
    picked = [specs[i] for i in indices]
    return [(i, result_record(*row)) for i, row in zip(indices, compile_all(picked, arch), strict=True)]


def main(argv: list[str] | None = None) -> int:
    """``python -m dfkd_fast.kernels.aot --arch 90 80 --json out.json [--subset]``: compile and report."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    p.add_argument("--subset", action="store_true", help="only a covering subset (see covering_subset)")
    p.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES))
    p.add_argument("--json", help="write the rows here (default: stdout)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        p.error("TRITON_INTERPRET=1 is set: the kernels are interpreter objects and cannot be compiled; unset it")
    reason = unavailable_reason(max(args.arch))
    if reason:
        print(f"cannot compile ahead of time: {reason}", file=sys.stderr)
        return 2
    specs = all_specializations(args.modules)
    if args.subset:
        specs = covering_subset(specs)
    rows = []
    for arch in args.arch:
        t0 = time.perf_counter()
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            chunks = [(tuple(args.modules), args.subset, arch, list(range(j, len(specs), args.jobs)))
                      for j in range(args.jobs)]
            with ProcessPoolExecutor(args.jobs) as pool:
                done = dict(row for part in pool.map(_compile_indices, chunks) for row in part)
            rows += [dict(done[i], arch=arch) for i in range(len(specs))]
        else:
            def progress(spec, res, err, arch=arch):
                if not args.quiet:
                    state = f"ERROR {type(err).__name__}" if err else f"regs={res.registers} spills={res.spills}"
                    print(f"sm_{arch} {spec.key}: {state}", file=sys.stderr, flush=True)

            for spec, res, err in compile_all(specs, arch, progress):
                rows.append(dict(result_record(spec, res, err), arch=arch))
        if not args.quiet:
            print(f"sm_{arch}: {len(specs)} specializations in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    text = json.dumps(rows, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
