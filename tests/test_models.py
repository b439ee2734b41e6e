"""Model zoo: every model builds and forwards; generators; load_model / save_model / classifier_weight errors."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from dfkd_fast.models import (
    DCGANGenerator,
    Generator,
    build_model,
    classifier_weight,
    list_models,
    load_model,
    save_model,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU workloads run fastest single-threaded on a shared machine; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

# (name, in_channels, image_size): every zoo model at its native size plus an edge case
CASES = [(name, 3, 32) for name in list_models()] + [
    ("lenet5", 1, 28),  # raw MNIST size, adaptive 5x5 pool
    ("resnet8", 1, 16),  # small input, grayscale
    ("wrn16_1", 3, 64),  # 64x64
    ("vgg11_bn", 3, 16),  # smaller than 2^5: ceil-mode pools
]


@pytest.mark.parametrize("name,cin,size", CASES)
def test_zoo_forward(name, cin, size):
    m = build_model(name, num_classes=7, in_channels=cin, image_size=size).eval()
    with torch.no_grad():
        y = m(torch.rand(2, cin, size, size))
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    assert classifier_weight(m).shape[0] == 7


def test_zoo_names_and_param_counts():
    assert set(list_models()) == {"lenet5", "lenet5_half", "lenet5_bn", "resnet8", "resnet18", "resnet34",
                                  "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg11_bn"}
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # the parameter counts reported by the ZSKD paper for the MNIST pair
    assert count(build_model("lenet5", in_channels=1)) == 61706
    assert count(build_model("lenet5_half", in_channels=1)) == 35820
    assert count(build_model("wrn40_2")) == 2243546
    bn_channels = sum(b.num_features for b in build_model("wrn40_2").modules() if isinstance(b, nn.BatchNorm2d))
    assert bn_channels == 2704  # CMI's feature size for WRN-40-2
    assert build_model("LeNet-5-Half", in_channels=1).features[0].out_channels == 3


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        build_model("resnet9")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="image_size must be >= 14"):
        build_model("lenet5", image_size=8)


@pytest.mark.parametrize("cls,size", [(Generator, 32), (Generator, 64), (DCGANGenerator, 32), (DCGANGenerator, 64)])
def test_generators_output_unit_range(cls, size):
    g = cls(nz=16, ngf=8, img_size=size, nc=3)
    x = g(torch.randn(3, 16) * 10)
    assert x.shape == (3, 3, size, size)
    assert x.min() >= 0 and x.max() <= 1
    x.mean().backward()
    assert g.l1[0].weight.grad is not None


def test_generator_names_reinit_and_errors():
    g = Generator(nz=8, ngf=4, img_size=32, nc=1)
    keys = set(g.state_dict())
    assert "l1.0.weight" in keys and "conv_blocks.0.weight" in keys and "conv_blocks.9.weight" in keys
    w0 = g.l1[0].weight.clone()
    g.reinit(std=0.02, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(w0, g.l1[0].weight)
    assert g.l1[0].weight.std().item() == pytest.approx(0.02, rel=0.2)
    with pytest.raises(ValueError, match="multiple of 4"):
        Generator(img_size=30)
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        g(torch.randn(2, 9))


def test_load_model_zoo_roundtrip(tmp_path):
    m = build_model("lenet5_bn", in_channels=1).eval()
    p = tmp_path / "t.safetensors"
    save_model(m, p)
    m2 = load_model("lenet5_bn", p, in_channels=1).eval()
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(m(x), m2(x))
    # torch.save path with a common wrapper and DataParallel prefixes
    p2 = tmp_path / "t.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}, "epoch": 3}, p2)
    assert torch.equal(load_model("lenet5_bn", p2, in_channels=1).eval()(x), m(x))


def test_load_model_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "my_zoo_mod.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def net(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))
        def fixed():
            return nn.Linear(4, 2)
        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("my_zoo_mod:net", num_classes=5)
    assert classifier_weight(m).shape == (5, 12)
    assert isinstance(load_model("my_zoo_mod:fixed"), nn.Linear)
    p = tmp_path / "n.safetensors"
    save_model(m, p)
    assert torch.equal(load_model("my_zoo_mod:net", p, num_classes=5)[1].weight, m[1].weight)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_model("my_zoo_mod:nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="expected torch.nn.Module"):
        load_model("my_zoo_mod:not_a_model")
    sys.modules.pop("my_zoo_mod", None)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("lenet5", tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_model("lenet5", bad)
    p = tmp_path / "half.safetensors"
    save_model(build_model("lenet5_half", in_channels=1), p)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_model("lenet5", p, in_channels=1)
    p2 = tmp_path / "bn.safetensors"
    save_model(build_model("lenet5_bn", in_channels=1), p2)
    with pytest.raises(ValueError, match=r"missing keys .*fc\.weight|unexpected keys .*running_mean"):
        load_model("lenet5", p2, in_channels=1)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_model("lenet5", p2, in_channels=1)
    with pytest.raises(ValueError, match="unknown model"):
        load_model("not_in_zoo")
    with pytest.raises(ValueError, match="package.module:factory"):
        load_model(":f")
    with pytest.raises(ValueError, match="no nn.Linear"):
        classifier_weight(nn.Conv2d(1, 1, 1))
