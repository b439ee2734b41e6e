"""Issue 12: bad values are refused with a message that names their source (the flag, the argument, the teacher),
not an internal op; the torch backend of the ops raises where the fused backends do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfkd_fast import _checks
from dfkd_fast.config import DistillConfig, SynthesizeConfig, merge_config, parse_floats, parse_image_size
from dfkd_fast.ops.bn_stats import bn_stat_loss
from dfkd_fast.ops.soft_ce import kd_kl_div, soft_target_cross_entropy

BACKENDS = ["torch", "cpp"]
REQUIRED = {"teacher": "t", "method": "m", "num_images": 4, "out": "o"}


@pytest.mark.parametrize("fn", [soft_target_cross_entropy, kd_kl_div])
def test_torch_backend_raises_like_cpp_on_overflow(fn):
    """Finite inputs whose logits / T overflow float32: every backend raises the same ValueError (was NaN)."""
    z, y = torch.randn(3, 4) * 1e3, torch.softmax(torch.randn(3, 4), -1)
    messages = set()
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="overflows float32") as info:
            fn(z, y, temperature=1e-38, backend=backend)
        messages.add(str(info.value))
        with pytest.raises(ValueError, match="overflows float32"), _checks.deferred():  # no sync: flag, read at exit
            fn(z, y, temperature=1e-38, backend=backend)
    assert len(messages) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["l2", "kl"])
def test_bn_stat_loss_names_negative_running_var_and_nan_weights(backend, kind):
    x = torch.randn(4, 3, 5, 5)
    rv = torch.tensor([1.0, -0.5, 1.0])
    for deferred in (False, True):
        with pytest.raises(ValueError, match="'running_vars' has a negative entry"):
            with _checks.deferred() if deferred else _nullcontext():
                bn_stat_loss([x], [torch.zeros(3)], [rv], kind=kind, backend=backend)
        with pytest.raises(ValueError, match="'weights'.*NaN"):
            with _checks.deferred() if deferred else _nullcontext():
                bn_stat_loss([x], [torch.zeros(3)], [torch.ones(3)], weights=[float("nan")], kind=kind,
                             backend=backend)


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


@pytest.mark.parametrize("text,flag", [("inf", "std"), ("0.5,0", "std"), ("-1", "std"), ("nan", "mean"),
                                       ("", "mean"), (",", "std"), ([float("inf")], "mean")])
def test_parse_floats_refuses_non_finite_and_non_positive_std(text, flag):
    with pytest.raises(ValueError, match=f"--{flag}"):
        parse_floats(text, flag)


def test_parse_floats_and_image_size_accept_yaml_numbers():
    assert parse_floats(0.5, "mean") == [0.5]
    assert parse_floats([0.2, 1], "std") == [0.2, 1.0]
    assert parse_image_size([1, 8, 8]) == (1, 8, 8)
    with pytest.raises(ValueError, match="--image-size"):
        parse_image_size([1, 8.5, 8])
    with pytest.raises(ValueError, match="--image-size"):
        parse_image_size([1, None, 8])


@pytest.mark.parametrize("layer,words", [
    ({"num_images": "abc"}, ["--num-images", "'num_images'", "int"]),
    ({"batch_size": "4"}, ["--batch-size", "int"]),
    ({"batch_size": True}, ["--batch-size", "int"]),
    ({"preview": -3}, ["--preview", ">= 0"]),
    ({"num_images": -1}, ["--num-images", ">= 0"]),
    ({"resume": "yes"}, ["--resume", "true or false"]),
    ({"opt": [1, 2]}, ["--opt", "key=value"]),
    ({"out": ["a"]}, ["--out", "string"]),
])
def test_merge_config_names_the_key_and_the_type(layer, words):
    with pytest.raises(ValueError) as info:
        merge_config(SynthesizeConfig, REQUIRED, layer)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("key", ["lr", "weight_decay", "temperature"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.1"])
def test_merge_config_refuses_non_finite_or_string_floats(key, value):
    with pytest.raises(ValueError, match=f"--{key.replace('_', '-')}"):
        merge_config(DistillConfig, {"transfer_set": "s", "teacher": "t", "student": "s"}, {key: value})


def test_merge_config_keeps_valid_values():
    cfg = merge_config(SynthesizeConfig, REQUIRED, {"seed": -1, "preview": 0, "mean": 0.5, "image_size": [1, 8, 8],
                                                    "opt": "iterations=2", "weights": None})
    assert cfg.seed == -1 and cfg.preview == 0 and cfg.mean == "0.5" and cfg.opt == ["iterations=2"]
    assert parse_image_size(cfg.image_size) == (1, 8, 8)


class _NaNTeacher(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan"))


def test_load_teacher_blames_a_nan_teacher(monkeypatch):
    import dfkd_fast.runner as runner

    monkeypatch.setattr(runner, "_load_user_model", lambda *a, **k: _NaNTeacher())
    with pytest.raises(ValueError, match="--teacher 'x' outputs NaN/Inf"):
        runner.load_teacher("x", None, 10, (1, 8, 8), torch.device("cpu"))


def test_storage_errors_say_disk_full_in_words(tmp_path):
    from dfkd_fast.runner import storage_errors

    with pytest.raises(OSError, match=r"--out .*: writing the transfer set failed: the disk is full or"):
        with storage_errors(str(tmp_path)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through unchanged
        with storage_errors(str(tmp_path)):
            raise RuntimeError("unrelated")


@pytest.mark.parametrize("value", [float("nan"), "inf", True, "abc"])
def test_method_options_from_yaml_are_checked(value):
    import dfkd_fast.synthesis as synthesis
    from dfkd_fast.config import parse_opts

    cfg = synthesis.REGISTRY["data_impressions"].Config
    assert parse_opts(cfg, {"lr": 1, "iterations": 2}) == {"lr": 1.0, "iterations": 2}
    with pytest.raises(ValueError, match="lr="):
        parse_opts(cfg, {"lr": value})
