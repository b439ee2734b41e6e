"""Packaging (issue 11, item 1): one version everywhere, an isolated build without torch that stops with one clear
message, an sdist that carries csrc/, declared optional dependencies, no debug info, a LICENSE.

Nothing is compiled here: setup.py is loaded as a module (its ``setup()`` call only runs as ``__main__``) and
its flag / extension functions are called; ``scripts/check_wheel.sh`` (run by ``.ci/run``) does the real
sdist -> wheel -> import build.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import dfkd_fast
from dfkd_fast import _backend
from dfkd_fast.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _load_setup():
    spec = importlib.util.spec_from_file_location("dfkd_fast_setup_py", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the functions, does not call setup()
    return mod


@pytest.fixture(scope="module")
def setup_py():
    return _load_setup()


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _pyproject_version(pyproject) -> str:
    project = pyproject["project"]
    if "version" in project:
        return project["version"]
    assert "version" in project.get("dynamic", []), "pyproject.toml: [project] has neither version nor dynamic"
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module, name = attr.rsplit(".", 1)
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    tree = ast.parse(open(path).read())
    for node in tree.body:  # the static read setuptools does
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no literal {name}")


def test_version_agrees_everywhere(setup_py, pyproject, capsys):
    v = dfkd_fast.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([a-z0-9.+-]*)", v), v
    assert _pyproject_version(pyproject) == v
    assert setup_py.VERSION == setup_py.read_version() == v
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out.strip()
    try:
        importlib.import_module("dfkd_fast._C")
        state = "built"
    except ImportError:
        state = "not built"
    assert out == f"dfkd-fast {v} (torch {torch.__version__}, extension {state})"


def test_pyproject_metadata(pyproject):
    project = pyproject["project"]
    assert project["name"] == "dfkd_fast"
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"] == {"dfkd-fast": "dfkd_fast.cli:main"}
    for extra in ("test", "bench", "data", "yaml"):
        assert project["optional-dependencies"].get(extra), f"pyproject.toml: no extra {extra!r}"
    # an isolated build must never pull a torch: the build requirements are setuptools and wheel only
    names = {re.split(r"[<>=!~; \[]", r, maxsplit=1)[0].lower() for r in pyproject["build-system"]["requires"]}
    assert names == {"setuptools", "wheel"}, names
    assert pyproject["build-system"]["build-backend"] == "setuptools.build_meta"


def test_license(pyproject):
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License") and "2026 dfkd_fast authors" in text
    assert pyproject["project"]["license"] == "MIT"
    assert "LICENSE" in pyproject["project"]["license-files"]


def _imports_yaml(path: str) -> bool:
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "yaml" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "yaml":
            return True
    return False


def test_pyyaml_declared_where_imported(pyproject):
    users = [os.path.relpath(os.path.join(d, f), ROOT)
             for pkg in ("dfkd_fast", "kernels") for d, _, files in os.walk(os.path.join(ROOT, pkg))
             for f in files if f.endswith(".py") and _imports_yaml(os.path.join(d, f))]
    if not users:
        pytest.skip("no module imports yaml")
    project = pyproject["project"]
    declared = project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]
    assert any(re.match(r"pyyaml\b", r, re.I) for r in declared), f"{users} import yaml; declare PyYAML"
    assert any(re.match(r"pyyaml\b", r, re.I) for r in project["optional-dependencies"]["yaml"])


def test_isolated_build_without_torch_stops_with_one_clear_message(setup_py, monkeypatch):
    monkeypatch.delenv("DFKD_FAST_SKIP_EXT", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError, as in a bare build env
    with pytest.raises(SystemExit) as e:
        setup_py._extensions()
    msg = str(e.value.code)
    assert "\n" not in msg
    assert "torch is not importable" in msg and "dfkd_fast._C" in msg
    assert "pip install --no-build-isolation ." in msg and "DFKD_FAST_SKIP_EXT=1" in msg
    # DFKD_FAST_SKIP_EXT=1: a pure-Python build, no error
    monkeypatch.setenv("DFKD_FAST_SKIP_EXT", "1")
    exts, cmdclass, info = setup_py._extensions()
    assert exts == [] and cmdclass == {} and info["extension"] is False and info["reason"] == "DFKD_FAST_SKIP_EXT=1"


_BLOCK_TORCH = textwrap.dedent("""\
    import importlib.abc, sys
    class _NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError("No module named 'torch'", name=name)
    sys.meta_path.insert(0, _NoTorch())
""")


def _mini_tree(root: str) -> None:
    """setup.py + pyproject.toml, the files they read, an empty module per package, one C++ source."""
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "dfkd_fast/_version.py", "csrc/bindings.cpp"):
        os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, f), os.path.join(root, f))
    for f in ("dfkd_fast/__init__.py", "kernels/__init__.py"):
        os.makedirs(os.path.dirname(os.path.join(root, f)), exist_ok=True)
        open(os.path.join(root, f), "w").close()
    os.makedirs(os.path.join(root, "block"))
    with open(os.path.join(root, "block", "sitecustomize.py"), "w") as f:
        f.write(_BLOCK_TORCH)


def test_setup_py_without_torch_in_a_subprocess(tmp_path):
    """The whole script, as pip's isolated build runs it, in an interpreter where torch cannot be imported:
    metadata works, a wheel build stops with the one-line message (no wheel, no build record), and
    DFKD_FAST_SKIP_EXT=1 builds a pure-Python wheel."""
    _mini_tree(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k not in ("DFKD_FAST_SKIP_EXT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path / "block")

    def run(*args):
        return subprocess.run([sys.executable, "setup.py", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    r = run("-q", "egg_info", "--egg-base", str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run("bdist_wheel")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dfkd_fast: torch is not importable") and "pip install --no-build-isolation ." in last
    assert not (tmp_path / "dfkd_fast" / "build_info.json").exists()
    assert not list(tmp_path.glob("dist/*.whl"))
    env["DFKD_FAST_SKIP_EXT"] = "1"
    r = run("-q", "bdist_wheel")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.glob("dist/*.whl")] == [f"dfkd_fast-{dfkd_fast.__version__}-py3-none-any.whl"]


def test_compile_flags_portable_no_debug_no_old_std(setup_py, monkeypatch):
    monkeypatch.delenv("DFKD_FAST_SKIP_EXT", raising=False)
    monkeypatch.delenv("DFKD_FAST_CPU_ARCH", raising=False)
    monkeypatch.delenv("DFKD_FAST_FORCE_CUDA", raising=False)
    exts, cmdclass, info = setup_py._extensions()
    assert info["extension"] is True and "build_ext" in cmdclass
    args = exts[0].extra_compile_args
    cxx = args["cxx"] if isinstance(args, dict) else args
    assert "-g0" in cxx and "-g" not in cxx and not any(re.fullmatch(r"-g[1-3]|-ggdb\d?", f) for f in cxx)
    assert not any(f.startswith("-std=c++17") for f in cxx)  # torch 2.13's headers need C++20
    from torch.utils.cpp_extension import include_paths

    for d in include_paths():  # torch headers as system headers: their warnings are not ours
        assert any(a == "-isystem" and b == d for a, b in zip(cxx, cxx[1:], strict=False)), d
    if sys.platform.startswith("linux"):
        assert "-s" in exts[0].extra_link_args
    assert setup_py.default_cpu_arch("x86_64") == "x86-64-v2" and setup_py.default_cpu_arch("AMD64") == "x86-64-v2"
    assert setup_py.default_cpu_arch("aarch64") == ""
    want = setup_py.default_cpu_arch()
    assert [f for f in cxx if f.startswith("-march")] == ([f"-march={want}"] if want else [])
    monkeypatch.setenv("DFKD_FAST_CPU_ARCH", "native")
    exts, _, info = setup_py._extensions()
    cxx = exts[0].extra_compile_args["cxx"]
    assert [f for f in cxx if f.startswith("-march")] == ["-march=native"] and info["cpu_arch"] == "native"
    # the setup script keeps building for the machine it runs on (an explicit value still wins)
    assert "export DFKD_FAST_CPU_ARCH=${DFKD_FAST_CPU_ARCH-native}" in open(os.path.join(ROOT, "scripts",
                                                                                          "setup.sh")).read()


def test_manifest_in_covers_every_file_under_csrc():
    from setuptools.command.egg_info import FileList

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        fl = FileList()
        fl.findall()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for line in open("MANIFEST.in"):
                line = line.strip()
                if line and not line.startswith("#"):
                    fl.process_template_line(line)
        shipped = {os.path.normpath(f) for f in fl.files}
    finally:
        os.chdir(cwd)
    csrc = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
            for f in files if not f.endswith((".o", ".so", ".pyc"))]
    assert "csrc/dfkd_fast.h" in csrc
    missing = sorted(set(csrc) - shipped)
    assert not missing, f"MANIFEST.in does not ship {missing}"
    for f in ("LICENSE", "README.md", "CMakeLists.txt", "pyproject.toml"):
        assert f in shipped, f
    assert not any(f.endswith(".so") or f == "dfkd_fast/build_info.json" for f in shipped)


def test_ci_runs_readme_tests_then_the_wheel_check():
    run = open(os.path.join(ROOT, ".ci", "run")).read()
    lines = [ln.strip() for ln in run.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    # the README test command, in a subshell whose failure ends CI (set -e ignores the left side of &&)
    tests = lines.index("(bash scripts/setup.sh && python3 -m pytest -q tests) || exit 1")
    wheel = next(i for i, ln in enumerate(lines) if "scripts/check_wheel.sh" in ln)
    assert wheel > tests
    script = open(os.path.join(ROOT, "scripts", "check_wheel.sh")).read()
    for piece in ("--system-site-packages", "--no-build-isolation", "--no-deps", "--no-index", "import dfkd_fast._C"):
        assert piece in script, piece


def test_missing_extension_warning_gives_a_working_command(monkeypatch):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_C_ERROR", None)
    monkeypatch.setattr(_backend, "_C_TRIED", False)
    monkeypatch.setitem(sys.modules, "dfkd_fast._C", None)  # the import now fails as if never built
    with pytest.warns(UserWarning) as rec:
        assert _backend.extension() is None
    msg = str(rec[0].message)
    assert "pip install --no-build-isolation --no-deps -e ." in msg and "python setup.py build_ext --inplace" in msg


def test_readme_shows_the_no_isolation_install_beside_the_setup_script():
    readme = open(os.path.join(ROOT, "README.md")).read()
    setup_at = readme.index("bash scripts/setup.sh")
    assert "pip install --no-build-isolation ." in readme[setup_at:setup_at + 3000]


def test_setup_and_wheel_checks_load_torch_before_the_extension():
    """``import dfkd_fast`` no longer imports torch (lazy), and ``_C`` links against torch's libc10: every script
    that imports ``dfkd_fast._C`` directly must import torch first (CI failed with 'libc10.so: cannot open')."""
    for rel in ("scripts/setup.sh", "scripts/check_wheel.sh"):
        text = open(os.path.join(ROOT, rel)).read()
        i = text.index("dfkd_fast._C\"") if rel.endswith("setup.sh") else text.index("import dfkd_fast._C as C")
        assert "import torch" in text[max(0, i - 200):i], rel
