"""Export of a transfer set to an ImageFolder-style directory (PNG, one folder per teacher top-1 class).

Layout of ``out_dir``::

    00/0000000.png ...        one folder for EVERY class 0..K-1 (empty ones too), zero-padded to the same
    01/ ...                   width so that sorted folder names give the class indices; ``03_cat`` style
                              (index + name) when class names are known (argument or the manifest's meta)
    labels.csv                ``file,label`` per image (file relative to out_dir, label = teacher top-1)
    logits.npy                float32 (N, K) teacher logits in set order (row i = image i of the set)
    export.json               what was exported (marks the folder as an export for ``overwrite=True``)
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil

import numpy as np
import torch

from dfkd_fast.transfer_set.manifest import LOGITS_KEY
from dfkd_fast.transfer_set.reader import TransferSet

__all__ = ["export_png", "class_folders", "EXPORT_MARKER"]

EXPORT_MARKER = "export.json"


def class_folders(num_classes: int, class_names: list[str] | None = None) -> list[str]:
    """Folder names for classes 0..K-1: zero-padded indices (width >= 2) so that their sorted order is the
    class order, followed by ``_<name>`` (path separators and odd characters replaced by ``_``) if names are
    given."""
    width = max(2, len(str(num_classes - 1)))
    out = []
    for c in range(num_classes):
        label = f"{c:0{width}d}"
        if class_names is not None and c < len(class_names):
            label += "_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", str(class_names[c])).strip("._") or "class")
        out.append(label)
    return out


def _prepare(out_dir: str, src: str, overwrite: bool) -> None:
    real_out, real_src = os.path.realpath(out_dir), os.path.realpath(src)
    if real_out == real_src or real_src.startswith(real_out + os.sep) or real_out.startswith(real_src + os.sep):
        raise ValueError(f"export-png: --out {out_dir} overlaps the transfer set {src}; choose another --out")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export-png: --out {out_dir} is a file; choose a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        raise ValueError(f"export-png: --out {out_dir} is not empty; pass --overwrite to replace an earlier export "
                         "or choose an empty directory")
    if not os.path.isfile(os.path.join(out_dir, EXPORT_MARKER)):
        raise ValueError(f"export-png: --out {out_dir} is not empty and holds no {EXPORT_MARKER} of an earlier "
                         "export, so --overwrite will not delete it; choose an empty directory")
    for name in os.listdir(out_dir):
        p = os.path.join(out_dir, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)


def export_png(path: str | os.PathLike, out_dir: str | os.PathLike, class_names: list[str] | None = None,
               overwrite: bool = False) -> int:
    """Write every image of a transfer set as ``out_dir/<class folder>/<index:07d>.png`` (class = argmax of the
    teacher logits), plus ``labels.csv``, ``logits.npy`` and ``export.json`` (layout: module docstring).

    Args:
        path: the transfer-set directory (its shards are verified as they are read).
        out_dir: destination; must be empty or missing unless ``overwrite`` (which first deletes an earlier
            export there -- only a folder holding ``export.json``).
        class_names: names for the class folders (default: ``class_names`` of the manifest or its meta).

    Returns:
        the number of images written.
    """
    from PIL import Image

    ts = TransferSet(path)
    out_dir = os.fspath(out_dir)
    _prepare(out_dir, ts.path, overwrite)
    names = class_names or ts.manifest.get("class_names") or ts.meta.get("class_names")
    k = int((ts.manifest.get("layout") or {}).get("num_classes") or ts.meta.get("num_classes") or 0)
    logits = []
    rows: list[tuple[str, int]] = []
    folders: list[str] = []
    for j in range(len(ts._shards)):
        d = ts._shard(j)
        if not folders:
            k = max(k, int(d[LOGITS_KEY].shape[1]))
            folders = class_folders(k, names)
            for f in folders:
                os.makedirs(os.path.join(out_dir, f), exist_ok=True)
        imgs = d["images"]
        u8 = imgs if imgs.dtype == torch.uint8 else imgs.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        lg = d[LOGITS_KEY].float()
        logits.append(lg)
        cls = lg.argmax(1)
        for i in range(u8.shape[0]):
            c = int(cls[i])
            rel = f"{folders[c]}/{ts._starts[j] + i:07d}.png"
            arr = u8[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr[..., :3])
            img.save(os.path.join(out_dir, *rel.split("/")))
            rows.append((rel, c))
    if not folders:  # an empty set: still one (empty) folder per class
        folders = class_folders(k, names) if k else []
    for f in folders:
        os.makedirs(os.path.join(out_dir, f), exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        w.writerows(rows)
    all_logits = torch.cat(logits) if logits else torch.zeros(0, k)
    np.save(os.path.join(out_dir, "logits.npy"), all_logits.numpy().astype(np.float32))
    with open(os.path.join(out_dir, EXPORT_MARKER), "w") as f:
        json.dump({"transfer_set": ts.path, "images": len(rows), "classes": folders,
                   "logits": "logits.npy", "labels": "labels.csv"}, f, indent=1)
    return len(rows)
