"""Bundled real data (fixed splits), teacher training and caching."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from dfkd_fast.datasets import digits, digits_indices, mnist5k, mnist5k_indices, sample_photos, tensor_loader
from dfkd_fast.models import build_model
from dfkd_fast.teachers import cached_mnist_teacher, evaluate, random_affine, random_shift, train_classifier


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU workloads run fastest single-threaded on a shared machine; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_mnist5k_fixed_stratified_split():
    tr, te = mnist5k_indices("train"), mnist5k_indices("test")
    assert len(tr) == 4000 and len(te) == 1000
    assert not set(tr.tolist()) & set(te.tolist())
    assert np.array_equal(tr, mnist5k_indices("train"))  # same indices twice
    x, y = mnist5k("train")
    assert x.shape == (4000, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 400))
    xt, yt = mnist5k("test")
    assert torch.equal(torch.bincount(yt), torch.full((10,), 100))
    # 32 = 28 zero-padded by 2 on each side
    x28, _ = mnist5k("train", image_size=28)
    assert torch.equal(x[:, :, 2:30, 2:30], x28)
    assert float(x[:, :, :2].abs().sum()) == 0.0
    x16, _ = mnist5k("test", image_size=16)  # bilinear downsampling
    assert x16.shape == (1000, 1, 16, 16)
    with pytest.raises(ValueError, match="split must be one of"):
        mnist5k("val")
    with pytest.raises(ValueError, match="resize='bilinear'"):
        mnist5k("test", image_size=31, resize="pad")


def test_digits_split_and_range():
    x, y = digits("train", image_size=32)
    xt, yt = digits("test", image_size=32)
    assert len(x) + len(xt) == 1797 and len(xt) == 359
    assert not set(digits_indices("train").tolist()) & set(digits_indices("test").tolist())
    assert x.shape[1:] == (1, 32, 32) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert torch.bincount(yt).min() >= 34
    x8, _ = digits("all", image_size=8)
    assert x8.shape == (1797, 1, 8, 8) and float(x8.max()) == 1.0


def test_sample_photos():
    photos = sample_photos(size=24)
    assert len(photos) >= 5
    for p in photos:
        assert p.shape == (3, 24, 24) and float(p.min()) >= 0 and float(p.max()) <= 1
    with pytest.raises(ValueError, match="no image 'nope'"):
        sample_photos(names=("nope",))


def test_tensor_loader_seeded():
    x = torch.arange(20).float().view(20, 1)
    order = lambda s: torch.cat([b[0] for b in tensor_loader(x, None, 6, True, s)]).view(-1)  # noqa: E731
    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert sorted(order(3).tolist()) == list(range(20))
    with pytest.raises(ValueError, match="same length"):
        tensor_loader(x, torch.zeros(3))


def test_augmentations_shapes():
    x = torch.rand(4, 1, 12, 12)
    s = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert s.shape == x.shape
    # every shifted image is a translate of the original: total mass can only drop (zero fill)
    assert bool((s.sum((1, 2, 3)) <= x.sum((1, 2, 3)) + 1e-5).all())
    a = random_affine(x, generator=torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.isfinite(a).all()
    ident = random_affine(x, max_rotate=0, max_scale=0, max_shift=0)
    torch.testing.assert_close(ident, x)


def test_train_classifier_learns_and_kd():
    x, y = digits("train", image_size=16)
    xt, yt = digits("test", image_size=16)
    m = build_model("lenet5", in_channels=1, image_size=16)
    h = train_classifier(m, x, y, epochs=3, lr=3e-3, batch_size=64, seed=0, x_test=xt, y_test=yt, num_threads=1)
    assert h["loss"][-1] < h["loss"][0]
    assert h["final_test_acc"] > 0.6  # chance is 0.1
    assert evaluate(m, xt, yt) == pytest.approx(h["final_test_acc"])
    s = build_model("lenet5_half", in_channels=1, image_size=16)
    hk = train_classifier(s, x, None, epochs=4, lr=3e-3, kd_teacher=m, T=2.0, seed=0, x_test=xt, y_test=yt,
                          num_threads=1)
    assert hk["loss"][-1] < hk["loss"][0]
    assert hk["final_test_acc"] > 0.35  # labels never seen: learned from the teacher alone
    with pytest.raises(ValueError, match="labels y are required"):
        train_classifier(s, x, None, epochs=1)
    with pytest.raises(ValueError, match="augment must be"):
        train_classifier(s, x, y, epochs=1, augment="mixup")


def test_cached_mnist_teacher_caches(tmp_path):
    t0 = time.perf_counter()
    m, acc = cached_mnist_teacher("lenet5_half", cache_dir=tmp_path, epochs=1, batch_size=128)
    first = time.perf_counter() - t0
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".safetensors") and "lenet5_half" in files[0]
    assert acc > 0.5 and not m.training
    t0 = time.perf_counter()
    m2, acc2 = cached_mnist_teacher("lenet5_half", cache_dir=tmp_path, epochs=1, batch_size=128)
    second = time.perf_counter() - t0
    assert acc2 == acc
    x, _ = mnist5k("test")
    with torch.no_grad():
        assert torch.equal(m(x[:8]), m2(x[:8]))
    assert second < first
    # a damaged cache file is retrained, with a warning
    (tmp_path / files[0]).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"):
        _, acc3 = cached_mnist_teacher("lenet5_half", cache_dir=tmp_path, epochs=1, batch_size=128)
    assert acc3 == acc


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["lenet5", "lenet5_bn"])
def test_mnist_teacher_quality(arch, tmp_path):
    t0 = time.perf_counter()
    _, acc = cached_mnist_teacher(arch, cache_dir=tmp_path)
    assert acc >= 0.98, f"{arch}: {acc:.4f} on the 1,000 MNIST-5k test images"
    assert time.perf_counter() - t0 < 120
