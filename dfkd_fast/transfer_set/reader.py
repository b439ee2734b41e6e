"""Reading a transfer set: :class:`TransferSet`, a ``torch.utils.data.Dataset`` over ``manifest.json``."""
from __future__ import annotations

import bisect
import json
import os
from typing import Any

import torch
from torch.utils.data import Dataset

from dfkd_fast.transfer_set.manifest import FORMAT, sha256_file

__all__ = ["TransferSet"]


class TransferSet(Dataset):
    """A written transfer set as a ``torch.utils.data.Dataset`` (reads ``manifest.json``, never rescans).

    Items are ``(image float32 (C, H, W) in [0, 1], soft_label float32 (K,), target)`` where target is an
    int64 scalar or a float32 (K,) soft target. Shards are loaded on first use and kept in memory.

    Args:
        path: the transfer-set directory.
        verify: check every shard's sha256 against the manifest now (``ValueError`` naming a corrupted shard).
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"TransferSet: {mpath} not found; finish the run (writer.close(), or resume "
                                    "it with TransferSetWriter(..., resume=True) and close) first")
        with open(mpath) as f:
            self.manifest: dict[str, Any] = json.load(f)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"TransferSet: {mpath} is not a {FORMAT} manifest")
        self.meta: dict[str, Any] = self.manifest.get("meta", {})
        self.soft_kind: str = self.manifest.get("soft_kind", "logits")
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        _check_shard_list(self._shards, int(self.manifest["total"]), mpath)
        self._starts = [s["start"] for s in self._shards]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        if verify:
            self.verify()

    def verify(self) -> None:
        """Check every shard's existence and sha256; raise naming the first bad shard."""
        for s in self._shards:
            p = os.path.join(self.path, s["file"])
            if not os.path.isfile(p):
                raise FileNotFoundError(f"TransferSet: shard {s['file']} listed in the manifest is missing")
            if sha256_file(p) != s["sha256"]:
                raise ValueError(f"TransferSet: shard {s['file']} is corrupted (sha256 does not match the manifest)")

    def __len__(self) -> int:
        return int(self.manifest["total"])

    def _shard(self, j: int) -> dict[str, torch.Tensor]:
        if j not in self._cache:
            from safetensors.torch import load_file

            p = os.path.join(self.path, self._shards[j]["file"])
            try:
                data = load_file(p)
            except FileNotFoundError:
                raise
            except Exception as e:  # a damaged file: name it
                raise ValueError(f"TransferSet: cannot read shard {self._shards[j]['file']} ({e}); "
                                 "run TransferSet(path, verify=True) to check all shards") from e
            if data["images"].shape[0] != self._shards[j]["count"]:
                raise ValueError(f"TransferSet: shard {self._shards[j]['file']} holds {data['images'].shape[0]} "
                                 f"images, the manifest says {self._shards[j]['count']}")
            self._cache[j] = data
        return self._cache[j]

    @staticmethod
    def _to_float(img: torch.Tensor) -> torch.Tensor:
        return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"TransferSet: index {i} out of range for {n} images")
        j = bisect.bisect_right(self._starts, i) - 1
        d = self._shard(j)
        k = i - self._starts[j]
        return self._to_float(d["images"][k]), d["soft_labels"][k].float(), d["targets"][k]

    def _all(self, key: str) -> torch.Tensor:
        return torch.cat([self._shard(j)[key] for j in range(len(self._shards))])

    def images(self) -> torch.Tensor:
        """All images, float32 (N, C, H, W) in [0, 1]."""
        return self._to_float(self._all("images"))

    def soft_labels(self) -> torch.Tensor:
        """All soft labels, float32 (N, K) (logits or probabilities: see ``soft_kind``)."""
        return self._all("soft_labels").float()

    def targets(self) -> torch.Tensor:
        """All targets, (N,) int64 or (N, K) float32."""
        return self._all("targets")

    def seeds(self) -> torch.Tensor:
        """Per-image seed of the batch that produced it, (N,) int64."""
        return self._all("seeds")


def _check_shard_list(shards: list[dict[str, Any]], total: int, mpath: str) -> None:
    """The manifest's shard list must describe one set: each shard a distinct file *inside* the set's directory
    (a bare file name, no ``..`` or path separators), the shards contiguous from image 0 and adding up to
    ``total``. Raises ``ValueError`` naming the manifest and the first bad entry (a shard listed twice would
    otherwise be read twice, and a path such as ``../x`` would read files outside the set)."""
    seen: set[str] = set()
    start = 0
    for i, sh in enumerate(shards):
        name = str(sh.get("file", ""))
        if not name or name != os.path.basename(name) or name in (".", "..") or "\\" in name or name.startswith("."):
            raise ValueError(f"TransferSet: {mpath} lists shard {i} as {name!r}, which is not a file of this set; "
                             "the manifest is damaged or was edited -- rewrite it (TransferSetWriter(..., resume=True)"
                             " then close()) or restore it")
        if name in seen:
            raise ValueError(f"TransferSet: {mpath} lists shard {name!r} twice; the manifest is damaged or was "
                             "edited -- rewrite it (TransferSetWriter(..., resume=True) then close()) or restore it")
        seen.add(name)
        if int(sh.get("start", -1)) != start or int(sh.get("count", -1)) < 0:
            raise ValueError(f"TransferSet: {mpath}: shard {name!r} starts at image {sh.get('start')} with count "
                             f"{sh.get('count')}, expected start {start}; the manifest is damaged or was edited")
        start += int(sh["count"])
    if start != total:
        raise ValueError(f"TransferSet: {mpath} says total={total} but its shards hold {start} images; the manifest "
                         "is damaged or was edited")
