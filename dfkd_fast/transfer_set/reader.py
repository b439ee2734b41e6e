"""Reading a transfer set: :class:`TransferSet`, a ``torch.utils.data.Dataset`` over ``manifest.json``."""
from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from dfkd_fast.transfer_set.manifest import FORMAT, LOGITS_KEY, logits_key, read_manifest, sha256_file

__all__ = ["TransferSet"]


class TransferSet(Dataset):
    """A written transfer set as a ``torch.utils.data.Dataset`` (reads ``manifest.json``, never rescans).

    Items are ``(image, teacher_logits float32 (K,), target)``: image float32 (C, H, W) in [0, 1] (or
    ``transform(image)``), target an int64 scalar or a float32 (K,) soft target. Shards are loaded on first use
    and kept in memory.

    Integrity: the manifest's own checksum (``manifest_sha256``) is checked when it is opened. By default each
    shard is checked once, when it is first read: its sha256 against the manifest (one pass over bytes that
    are read anyway) and its logits (and fp16 images) finite; a bad shard raises ``ValueError`` naming the file.

    Args:
        path: the transfer-set directory.
        verify: ``None`` (default): check each shard when first read; ``True``: also check every shard's
            sha256 now; ``False``: no shard checks (the manifest checksum is still checked).
        transform: optional callable applied to each image in ``__getitem__`` (e.g. an augmentation); the
            bulk accessors (:meth:`images` ...) return the stored images untransformed.
    """

    def __init__(self, path: str | os.PathLike, verify: bool | None = None,
                 transform: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"TransferSet: {mpath} not found; finish the run (writer.close(), or resume "
                                    "it with TransferSetWriter(..., resume=True) and close) first")
        if transform is not None and not callable(transform):
            raise ValueError(f"TransferSet: transform must be callable, got {type(transform).__name__}")
        self.manifest: dict[str, Any] = read_manifest(mpath)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"TransferSet: {mpath} is not a {FORMAT} manifest")
        self.meta: dict[str, Any] = self.manifest.get("meta", {})
        self.soft_kind: str = self.manifest.get("soft_kind", "logits")
        self.transform = transform
        self._check = verify is not False
        self._shards: list[dict[str, Any]] = self.manifest["shards"]
        _check_shard_list(self._shards, int(self.manifest["total"]), mpath)
        self._starts = [s["start"] for s in self._shards]
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        self._verified: set[int] = set()
        if verify:
            self.verify()

    def _file(self, j: int) -> str:
        return os.path.join(self.path, self._shards[j]["file"])

    def verify(self) -> None:
        """Check every shard's existence and sha256 now; raise naming the first bad shard."""
        for j in range(len(self._shards)):
            if j in self._verified:
                continue
            p = self._file(j)
            if not os.path.isfile(p):
                raise FileNotFoundError(f"TransferSet: shard {p} listed in the manifest is missing")
            self._check_digest(j, sha256_file(p))

    def _check_digest(self, j: int, digest: str) -> None:
        if digest != self._shards[j].get("sha256"):
            raise ValueError(f"TransferSet: shard {self._file(j)} is corrupted (sha256 does not match the manifest);"
                             " restore it or synthesize the set again")
        self._verified.add(j)

    def __len__(self) -> int:
        return int(self.manifest["total"])

    def _shard(self, j: int) -> dict[str, torch.Tensor]:
        """Shard j's tensors, logits under ``teacher_logits`` (read, checked and cached on first use)."""
        if j not in self._cache:
            from safetensors.torch import load

            p = self._file(j)
            try:
                with open(p, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                raise FileNotFoundError(f"TransferSet: shard {p} listed in the manifest is missing") from None
            if self._check and j not in self._verified:
                self._check_digest(j, hashlib.sha256(raw).hexdigest())
            try:
                data = load(raw)
            except Exception as e:  # a damaged file: name it
                raise ValueError(f"TransferSet: cannot read shard {p} ({e}); restore it or synthesize the set "
                                 "again") from e
            missing = [k for k in ("images", "targets") if k not in data]
            key = logits_key(data)
            if missing or key not in data:
                raise ValueError(f"TransferSet: shard {p} lacks {missing or [LOGITS_KEY]}; it is not a shard of "
                                 "a dfkd_fast transfer set")
            data[LOGITS_KEY] = data.pop(key)
            if data["images"].shape[0] != self._shards[j]["count"]:
                raise ValueError(f"TransferSet: shard {p} holds {data['images'].shape[0]} images, the manifest "
                                 f"says {self._shards[j]['count']}")
            if self._check:
                for what, key in (("teacher logits", LOGITS_KEY), ("images", "images")):
                    t = data[key]
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise ValueError(f"TransferSet: shard {p} holds NaN or Inf {what}; restore it or "
                                         "synthesize the set again")
            self._cache[j] = data
        return self._cache[j]

    @staticmethod
    def _to_float(img: torch.Tensor) -> torch.Tensor:
        return img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"TransferSet: index {i} out of range for {n} images")
        j = bisect.bisect_right(self._starts, i) - 1
        d = self._shard(j)
        k = i - self._starts[j]
        img = self._to_float(d["images"][k])
        if self.transform is not None:
            img = self.transform(img)
        return img, d[LOGITS_KEY][k].float(), d["targets"][k]

    def _all(self, key: str) -> torch.Tensor:
        return torch.cat([self._shard(j)[key] for j in range(len(self._shards))])

    def images(self) -> torch.Tensor:
        """All images, float32 (N, C, H, W) in [0, 1] (``transform`` is not applied)."""
        return self._to_float(self._all("images"))

    def teacher_logits(self) -> torch.Tensor:
        """All teacher logits, float32 (N, K) (probabilities if ``soft_kind == "probs"``)."""
        return self._all(LOGITS_KEY).float()

    def soft_labels(self) -> torch.Tensor:
        """Old name of :meth:`teacher_logits`."""
        return self.teacher_logits()

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
