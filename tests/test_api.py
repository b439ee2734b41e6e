"""Public API names and contracts (issue 11 item 5): the distill package/function names, generated keyword
signatures of every synthesizer, typed one-line validation, ``lr`` / ``lr_g`` aliases, and the caller's
teacher given back (``training`` / ``requires_grad``) when a synthesizer is closed or dropped."""
from __future__ import annotations

import dataclasses
import gc
import importlib
import inspect
import pydoc
import sys
import types

import pytest
import torch
from cli_models import tiny_bn_cnn, tiny_cnn

import dfkd_fast.synthesis as synthesis
from dfkd_fast.config import parse_opts
from dfkd_fast.synthesis import CMI, DeepInversion


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _teacher(k: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_bn_cnn(k, 3, 8)


# ----------------------------------------------------------------------------- names
def test_distill_package_is_the_module_and_old_import_still_runs():
    mod = importlib.import_module("dfkd_fast.tasks.distill")
    import dfkd_fast.tasks as tasks
    from dfkd_fast.tasks import distill as old_name  # the documented old spelling
    from dfkd_fast.tasks.distill import DistillResult
    from dfkd_fast.tasks.distill import distill as fn

    assert isinstance(tasks.distill, types.ModuleType) and tasks.distill is mod is sys.modules[mod.__name__]
    assert hasattr(tasks.distill, "offline") and hasattr(tasks.distill, "distill_online")
    assert tasks.distill_offline is fn and inspect.isfunction(fn)
    assert inspect.signature(old_name) == inspect.signature(fn)
    torch.manual_seed(0)
    x = torch.rand(8, 1, 8, 8)
    res = old_name(tiny_cnn(10, 1, 8), tiny_cnn(10, 1, 8), x, epochs=1, batch_size=4, progress=False,
                   curves=False, device="cpu")  # calling the package runs the offline KD function
    assert isinstance(res, DistillResult) and res.epochs == 1 and res.images == 8


# ----------------------------------------------------------------------------- signatures
@pytest.mark.parametrize("method", synthesis.list_methods())
def test_every_synthesizer_has_a_keyword_signature_from_its_config(method):
    cls = synthesis.REGISTRY[method]
    sig = inspect.signature(cls)
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds and inspect.Parameter.VAR_KEYWORD not in kinds, sig
    names = list(sig.parameters)
    assert names[:4] == ["teacher", "num_classes", "image_size", "config"]
    for base_kw in ("batch_size", "mean", "std", "device", "backend", "seed", "student", "compile", "precision"):
        assert sig.parameters[base_kw].kind is inspect.Parameter.KEYWORD_ONLY
    for f in dataclasses.fields(cls.Config):
        p = sig.parameters[f.name]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == f.default, (method, f.name)
    init_sig = inspect.signature(cls.__init__)
    assert list(init_sig.parameters)[0] == "self" and list(init_sig.parameters)[1:] == names
    assert f"{names[-1]}: " in pydoc.render_doc(cls, renderer=pydoc.plaintext)  # help() shows the keywords


def test_subclass_keywords_appear_in_the_signature():
    sig = inspect.signature(synthesis.ImpressionSpace)
    assert {"reference_images", "code", "layer_types", "lr", "var_weight"} <= set(sig.parameters)
    assert "g_steps" in inspect.signature(synthesis.FastMeta).parameters
    assert inspect.signature(CMI).parameters["lr_g"].default == CMI.Config.lr_g


# ----------------------------------------------------------------------------- typed validation
@pytest.mark.parametrize("kwargs, message", [
    ({"lr": "abc"}, "deep_inversion: lr must be a float > 0, got 'abc'"),
    ({"lr": -1.0}, "deep_inversion: lr must be a float > 0, got -1.0"),
    ({"iterations": 2.5}, "deep_inversion: iterations must be an int >= 1, got 2.5"),
    ({"iterations": 0}, "deep_inversion: iterations must be an int >= 1, got 0"),
    ({"flip": "maybe"}, "deep_inversion: flip must be a bool, got 'maybe'"),
    ({"betas": [0.5]}, "deep_inversion: betas must be a list of 2 values (a float, a float), got [0.5]"),
    ({"bn": None}, "deep_inversion: bn must be a float, got None"),
])
def test_wrong_hyper_parameter_types_give_one_line_value_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        DeepInversion(_teacher(), 10, (3, 8, 8), **kwargs)
    assert str(e.value) == message


def test_values_are_converted_to_the_field_types():
    s = DeepInversion(_teacher(), 10, (3, 8, 8), lr="0.2", iterations=3.0, betas=[0.4, 0.9], flip="false")
    assert s.config.lr == 0.2 and s.config.iterations == 3 and isinstance(s.config.iterations, int)
    assert s.config.betas == (0.4, 0.9) and s.config.flip is False
    with pytest.raises(ValueError, match=r"cmi: unknown hyper-parameter\(s\) \['nope'\]"):
        CMI(_teacher(), 10, (3, 8, 8), nope=1)


# ----------------------------------------------------------------------------- one name per concept
def test_lr_and_lr_g_are_aliases_of_each_other():
    assert CMI(_teacher(), 10, (3, 8, 8), lr=0.02).config.lr_g == 0.02
    assert DeepInversion(_teacher(), 10, (3, 8, 8), lr_g=0.3).config.lr == 0.3
    assert DeepInversion(_teacher(), 10, (3, 8, 8), T=2.0).config.temperature == 2.0
    assert CMI(_teacher(), 10, (3, 8, 8), temperature=4.0).config.T == 4.0
    with pytest.raises(ValueError, match="'lr_g' and 'lr' name the same hyper-parameter 'lr_g'"):
        CMI(_teacher(), 10, (3, 8, 8), lr_g=0.1, lr=0.2)
    assert parse_opts(CMI.Config, ["lr=0.01"]) == {"lr_g": 0.01}  # CLI --opt / config files too
    assert parse_opts(DeepInversion.Config, {"lr-g": "0.5"}) == {"lr": 0.5}


# ----------------------------------------------------------------------------- the caller's teacher
def _flags(m: torch.nn.Module) -> tuple[list[bool], list[bool]]:
    return [x.training for x in m.modules()], [p.requires_grad for p in m.parameters()]


def test_teacher_state_is_restored_when_the_synthesizer_is_dropped():
    teacher = _teacher().train()
    next(teacher.parameters()).requires_grad_(False)  # a caller's own mixed state comes back exactly
    teacher[1].eval()
    before = _flags(teacher)
    synth = DeepInversion(teacher, 10, (3, 8, 8), iterations=1, batch_size=2)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())  # held while alive
    synth.synthesize()
    del synth
    gc.collect()
    assert _flags(teacher) == before


def test_close_restores_once_no_synthesizer_holds_the_teacher():
    teacher = _teacher().train()
    before = _flags(teacher)
    a = CMI(teacher, 10, (3, 8, 8), iterations=1, batch_size=2)
    with DeepInversion(teacher, 10, (3, 8, 8), iterations=1, batch_size=2) as b:
        a.close()
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())  # b still holds it
        b.synthesize()
    assert _flags(teacher) == before
    a.close()  # idempotent
    assert _flags(teacher) == before
    with pytest.raises(ValueError, match="cmi: this synthesizer was closed"):
        a.synthesize()


def test_a_flag_the_caller_set_back_meanwhile_is_kept():
    teacher = _teacher().eval()
    synth = DeepInversion(teacher, 10, (3, 8, 8), iterations=1, batch_size=2)
    teacher.train()  # the caller's own change while the synthesizer lives
    synth.close()
    assert all(m.training for m in teacher.modules())
    assert all(p.requires_grad for p in teacher.parameters())
