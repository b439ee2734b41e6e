"""Export of a transfer set to an image folder (PNG, one folder per teacher top-1 class)."""
from __future__ import annotations

import os

import torch

from dfkd_fast.transfer_set.reader import TransferSet

__all__ = ["export_png"]


def export_png(path: str | os.PathLike, out_dir: str | os.PathLike,
               class_names: list[str] | None = None) -> int:
    """Write every image of a transfer set as ``out_dir/<class>/<index:07d>.png`` (class = argmax soft label).

    Returns:
        the number of files written.
    """
    from PIL import Image

    ts = TransferSet(path)
    out_dir = os.fspath(out_dir)
    names = class_names or ts.meta.get("class_names")
    written = 0
    for j in range(len(ts._shards)):
        d = ts._shard(j)
        imgs = d["images"]
        u8 = imgs if imgs.dtype == torch.uint8 else imgs.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        cls = d["soft_labels"].float().argmax(1)
        for k in range(u8.shape[0]):
            c = int(cls[k])
            label = str(names[c]) if names is not None and c < len(names) else str(c)
            folder = os.path.join(out_dir, label)
            os.makedirs(folder, exist_ok=True)
            arr = u8[k].permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr[..., :3])
            img.save(os.path.join(folder, f"{ts._starts[j] + k:07d}.png"))
            written += 1
    return written
