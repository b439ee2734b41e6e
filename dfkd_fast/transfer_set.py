"""Transfer sets on disk (SPEC §7, §8): sharded, checksummed, atomically written, resumable.

Layout of ``out_dir``::

    meta.json                             method, hyper-parameters, teacher fingerprint, versions (at open)
    shard-{rank:03d}-{index:06d}.safetensors   images (uint8 or fp16), soft_labels, targets, seeds
    journal-{rank:03d}.jsonl              one line per committed shard: file, count, sha256
    state-{rank:03d}.pt                   optional synthesizer state (torch.save, weights_only-loadable)
    done-{rank:03d}.json                  the rank's shard list, written by ``close()``
    manifest.json                         everything :class:`TransferSet` needs; written last

Commit protocol: a shard is written to ``<name>.tmp``, fsynced and ``os.replace``d to its final name, then a
journal line is appended and fsynced -- the journal line is the commit point. ``resume=True`` deletes temp
files and shard files without a journal line, checks the sha256 of every committed shard (a mismatch is an
error, never silently dropped) and continues numbering after the last one, so no finished shard is duplicated
or lost. Synthesizer state: ``writer.state = synth.state_dict()`` first flushes the buffer (possibly a short
shard), commits it, then saves the state atomically, recording how many shards it covers. If a crash leaves
committed shards newer than the saved state, resuming rolls the journal back to the state (those images will be
regenerated from it exactly once); without any saved state every committed shard is kept and the caller
continues from ``writer.num_images`` -- unless the writer is ``stateful=True``, where no state means a restart.
"""
from __future__ import annotations

import bisect
import contextlib
import glob
import hashlib
import json
import os
import platform
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dfkd_fast.viz import save_grid

__all__ = ["TransferSetWriter", "TransferSet", "export_png", "teacher_fingerprint", "finalize_manifest",
           "save_grid", "sha256_file", "FORMAT", "FORMAT_VERSION"]

FORMAT = "dfkd_fast.transfer_set"
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def teacher_fingerprint(model: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over the state_dict in key order: name, dtype, shape and raw bytes of every tensor."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import dfkd_fast

    return {"dfkd_fast": dfkd_fast.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; rename stays atomic
            os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _atomic_write_json(path: str, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _jsonable(meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(meta), sort_keys=True))
    except TypeError as e:
        raise ValueError(f"TransferSetWriter: meta must be JSON-serializable (str/int/float/bool/list/dict): {e}"
                         ) from e


class TransferSetWriter:
    """Incremental, crash-safe writer of a transfer set.

    Args:
        out_dir: directory (created). Must not contain this rank's shards unless ``resume=True``.
        meta: JSON-serializable description, e.g. ``{"method": "cmi", "hparams": {...}, "teacher": fingerprint}``.
        shard_size: images per full shard.
        store: ``"uint8"`` (round(255 x), the default) or ``"fp16"`` for the images.
        soft_dtype: ``"fp32"`` or ``"fp16"`` for the soft labels.
        soft_kind: what ``soft_labels`` holds, recorded in the manifest: ``"logits"`` (teacher logits,
            recommended: any temperature can be applied later) or ``"probs"``.
        rank, world_size: this process's rank for multi-process synthesis (disjoint shard names).
        resume: continue an interrupted run in ``out_dir`` (see the module docstring).
        teacher: optional teacher; its :func:`teacher_fingerprint` is stored as ``meta["teacher"]``.
        stateful: the run always resumes from a saved ``state``: on resume with no state file, committed
            shards are discarded too (the run restarts from scratch instead of from ``num_images``).

    Shape (``add``):
        images (N, C, H, W) in [0, 1]; soft_labels (N, K); targets (N,) int or (N, K) float or None.
    """

    def __init__(self, out_dir: str | os.PathLike, meta: Mapping[str, Any] | None = None, shard_size: int = 1024,
                 store: str = "uint8", soft_dtype: str = "fp32", soft_kind: str = "logits", rank: int = 0,
                 world_size: int = 1, resume: bool = False, teacher: nn.Module | None = None,
                 stateful: bool = False) -> None:
        if store not in ("uint8", "fp16"):
            raise ValueError(f"TransferSetWriter: store must be 'uint8' or 'fp16', got {store!r}")
        if soft_dtype not in ("fp32", "fp16"):
            raise ValueError(f"TransferSetWriter: soft_dtype must be 'fp32' or 'fp16', got {soft_dtype!r}")
        if soft_kind not in ("logits", "probs"):
            raise ValueError(f"TransferSetWriter: soft_kind must be 'logits' or 'probs', got {soft_kind!r}")
        if shard_size < 1:
            raise ValueError(f"TransferSetWriter: shard_size must be >= 1, got {shard_size}")
        if not (0 <= rank < world_size):
            raise ValueError(f"TransferSetWriter: need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.shard_size, self.store, self.soft_dtype, self.soft_kind = int(shard_size), store, soft_dtype, soft_kind
        self.rank, self.world_size = int(rank), int(world_size)
        self.stateful = bool(stateful)
        meta = _jsonable(meta or {})
        if teacher is not None:
            meta["teacher"] = teacher_fingerprint(teacher)
        self.meta = meta
        self._entries: list[dict[str, Any]] = []
        self._buf: list[dict[str, torch.Tensor]] = []
        self._buffered = 0
        self._layout: dict[str, Any] | None = None
        self._state: Any = None
        self._closed = False
        os.makedirs(self.out_dir, exist_ok=True)
        self._journal = os.path.join(self.out_dir, f"journal-{self.rank:03d}.jsonl")
        self._state_path = os.path.join(self.out_dir, f"state-{self.rank:03d}.pt")
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta, "store": store,
                "soft_dtype": soft_dtype, "soft_kind": soft_kind, "shard_size": self.shard_size,
                "world_size": self.world_size}
        meta_path = os.path.join(self.out_dir, "meta.json")
        existing = self._my_files()
        if resume:
            if os.path.isfile(meta_path):
                with open(meta_path) as f:
                    old = json.load(f)
                diff = sorted(k for k in set(old) | set(info)
                              if k not in ("created", "versions") and old.get(k) != info.get(k))
                if diff:
                    raise ValueError(f"TransferSetWriter: resume=True but {meta_path} differs in {diff}; resume with "
                                     "the same meta / store / shard_size, or write to a new out_dir")
                info["created"] = old.get("created", time.time())
            self._recover()
        elif existing or os.path.isfile(os.path.join(self.out_dir, "manifest.json")):
            raise ValueError(f"TransferSetWriter: {self.out_dir} already holds a transfer set (rank {self.rank}); "
                             "pass resume=True to continue it or choose an empty out_dir")
        info.setdefault("created", time.time())
        info["versions"] = _versions()
        if self.rank == 0 or not os.path.isfile(meta_path):
            _atomic_write_json(meta_path, info)
        self._info = info

    # ------------------------------------------------------------------ recovery
    def _my_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.out_dir, f"shard-{self.rank:03d}-*.safetensors")))

    def _recover(self) -> None:
        for tmp in glob.glob(os.path.join(self.out_dir, f"*-{self.rank:03d}*.tmp")):
            os.remove(tmp)
        if self.rank == 0:
            for tmp in glob.glob(os.path.join(self.out_dir, "*.json.tmp")):
                os.remove(tmp)
        entries = self._read_journal()
        for e in entries:
            p = os.path.join(self.out_dir, e["file"])
            if not os.path.isfile(p):
                raise ValueError(f"TransferSetWriter: committed shard {e['file']} is missing from {self.out_dir}; "
                                 "restore it or start a new transfer set")
            if sha256_file(p) != e["sha256"]:
                raise ValueError(f"TransferSetWriter: committed shard {e['file']} is corrupted (sha256 mismatch); "
                                 "restore it or start a new transfer set")
        if os.path.isfile(self._state_path):
            saved = self._load_state_file()
            n_state = int(saved["num_shards"])
            if n_state > len(entries):
                raise ValueError(f"TransferSetWriter: {self._state_path} covers {n_state} shards but the journal "
                                 f"has {len(entries)}; the journal was damaged, start a new transfer set")
            if n_state < len(entries):
                entries = entries[:n_state]
                self._rewrite_journal(entries)
            self._state = saved["state"]
        elif self.stateful and entries:
            entries = []
            self._rewrite_journal(entries)
        committed = {e["file"] for e in entries}
        for p in self._my_files():
            if os.path.basename(p) not in committed:
                os.remove(p)
        self._entries = entries
        if entries:
            first = os.path.join(self.out_dir, entries[0]["file"])
            from safetensors import safe_open

            with safe_open(first, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()[1:]) for k in ("images", "soft_labels", "targets")}
            self._layout = {"images": shapes["images"], "K": shapes["soft_labels"][0], "targets": shapes["targets"]}

    def _read_journal(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self._journal):
            return []
        with open(self._journal, "rb") as f:
            lines = f.read().split(b"\n")
        entries: list[dict[str, Any]] = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                entries.append(json.loads(raw))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:  # torn final line: the shard was never committed
                    break
                raise ValueError(f"TransferSetWriter: journal {self._journal} line {i + 1} is corrupted") from e
        for i, e in enumerate(entries):
            if e.get("index") != i:
                raise ValueError(f"TransferSetWriter: journal {self._journal} is out of order at line {i + 1}")
        self._rewrite_journal(entries)
        return entries

    def _rewrite_journal(self, entries: list[dict[str, Any]]) -> None:
        _atomic_write_bytes(self._journal, b"".join((json.dumps(e, sort_keys=True) + "\n").encode()
                                                    for e in entries))

    def _load_state_file(self) -> dict[str, Any]:
        try:
            return torch.load(self._state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # report which file and why; the caller decides whether to start over
            raise ValueError(f"TransferSetWriter: cannot read synthesizer state {self._state_path} "
                             f"({type(e).__name__}: {e})") from e

    # ------------------------------------------------------------------ writing
    @property
    def num_committed(self) -> int:
        """Images in committed shards (durable)."""
        return sum(e["count"] for e in self._entries)

    @property
    def num_images(self) -> int:
        """Images added so far: committed + buffered. After ``resume=True`` this equals :attr:`num_committed`."""
        return self.num_committed + self._buffered

    @property
    def num_shards(self) -> int:
        return len(self._entries)

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Committed shard records (file, index, count, sha256, start)."""
        return [dict(e) for e in self._entries]

    def add(self, images: torch.Tensor, soft_labels: torch.Tensor, targets: torch.Tensor | None = None,
            seed: int = 0) -> None:
        """Buffer a batch and commit every full shard.

        Args:
            images: (N, C, H, W) float in [0, 1] (clamped; stored as round(255 x) for ``store="uint8"``).
            soft_labels: (N, K) teacher logits or probabilities (see ``soft_kind``).
            targets: (N,) int64 hard targets, (N, K) soft targets used in synthesis, or None (argmax of
                soft_labels is stored).
            seed: the seed that produced this batch (stored per image).
        """
        if self._closed:
            raise ValueError("TransferSetWriter.add: the writer is closed")
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"TransferSetWriter.add: images must be a float (N, C, H, W) tensor, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        n = images.shape[0]
        if not isinstance(soft_labels, torch.Tensor) or soft_labels.dim() != 2 or soft_labels.shape[0] != n:
            raise ValueError(f"TransferSetWriter.add: soft_labels must be (N={n}, K), got "
                             f"{tuple(getattr(soft_labels, 'shape', ()))}")
        images = images.detach().to("cpu", torch.float32)
        soft = soft_labels.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(images).all()) or not bool(torch.isfinite(soft).all()):
            raise ValueError("TransferSetWriter.add: images / soft_labels contain NaN or Inf")
        if targets is None:
            tgt = soft.argmax(1)
        else:
            if targets.shape[0] != n or targets.dim() not in (1, 2):
                raise ValueError(f"TransferSetWriter.add: targets must be (N={n},) or (N, K), got "
                                 f"{tuple(targets.shape)}")
            tgt = targets.detach().to("cpu")
            tgt = tgt.to(torch.int64) if tgt.dim() == 1 else tgt.to(torch.float32)
        layout = {"images": tuple(images.shape[1:]), "K": soft.shape[1], "targets": tuple(tgt.shape[1:])}
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f"TransferSetWriter.add: batch layout {layout} differs from the set's {self._layout}")
        img = (images.clamp(0, 1).mul(255).round().to(torch.uint8) if self.store == "uint8"
               else images.clamp(0, 1).to(torch.float16))
        self._buf.append({"images": img.contiguous(),
                          "soft_labels": soft.to(torch.float16 if self.soft_dtype == "fp16" else torch.float32),
                          "targets": tgt.contiguous(), "seeds": torch.full((n,), int(seed), dtype=torch.int64)})
        self._buffered += n
        self.flush(partial=False)

    def flush(self, partial: bool = True) -> None:
        """Commit full shards from the buffer; with ``partial=True`` also the remainder as a short shard."""
        while self._buffered >= self.shard_size or (partial and self._buffered > 0):
            cat = {k: torch.cat([b[k] for b in self._buf]) for k in self._buf[0]}
            take = min(self.shard_size, self._buffered)
            self._commit({k: v[:take].contiguous() for k, v in cat.items()})
            rest = {k: v[take:].contiguous() for k, v in cat.items()}
            self._buffered -= take
            self._buf = [rest] if self._buffered else []

    def _commit(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        index = len(self._entries)
        name = f"shard-{self.rank:03d}-{index:06d}.safetensors"
        path = os.path.join(self.out_dir, name)
        tmp = path + ".tmp"
        count = int(tensors["images"].shape[0])
        save_file(tensors, tmp, metadata={"format": FORMAT, "rank": str(self.rank), "index": str(index),
                                          "count": str(count), "store": self.store})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(self.out_dir)
        entry = {"index": index, "file": name, "count": count, "sha256": digest, "start": self.num_committed,
                 "rank": self.rank}
        with open(self._journal, "ab") as f:
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self._entries.append(entry)

    @property
    def state(self) -> Any:
        """The last saved synthesizer state (restored by ``resume=True``), or None."""
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        """Commit the buffer, then save ``value`` (tensors / dicts / lists / numbers) atomically for resume."""
        self.flush(partial=True)
        payload = {"state": value, "num_shards": len(self._entries), "num_images": self.num_committed}
        tmp = self._state_path + ".tmp"
        torch.save(payload, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self._state_path)
        _fsync_dir(self.out_dir)
        self._state = value

    def close(self, finalize: bool | None = None) -> str | None:
        """Commit the buffer, write ``done-{rank}.json`` and (rank 0, by default when ``world_size == 1``)
        ``manifest.json``. Multi-process runs: barrier, then rank 0 calls :func:`finalize_manifest`.

        Returns:
            the manifest path if written, else None.
        """
        if self._closed:
            raise ValueError("TransferSetWriter.close: already closed")
        self.flush(partial=True)
        done = {"rank": self.rank, "shards": self.shards, "total": self.num_committed, "layout": self._layout}
        _atomic_write_json(os.path.join(self.out_dir, f"done-{self.rank:03d}.json"), done)
        self._closed = True
        if finalize is None:
            finalize = self.world_size == 1
        if finalize:
            return finalize_manifest(self.out_dir)
        return None

    def __enter__(self) -> TransferSetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and not self._closed:
            self.close()


def finalize_manifest(out_dir: str | os.PathLike) -> str:
    """Merge ``meta.json`` and every rank's ``done-*.json`` into ``manifest.json`` (atomic). Returns its path."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"finalize_manifest: {meta_path} not found; is {out_dir} a transfer set?")
    with open(meta_path) as f:
        info = json.load(f)
    ws = int(info.get("world_size", 1))
    shards: list[dict[str, Any]] = []
    layout = None
    missing = []
    for r in range(ws):
        p = os.path.join(out_dir, f"done-{r:03d}.json")
        if not os.path.isfile(p):
            missing.append(r)
            continue
        with open(p) as f:
            done = json.load(f)
        shards += done["shards"]
        layout = layout or done.get("layout")
    if missing:
        raise ValueError(f"finalize_manifest: ranks {missing} have not closed their writers in {out_dir}")
    start = 0
    for s in shards:
        s["start"] = start
        start += s["count"]
    if layout is not None:
        layout = {"image_shape": list(layout["images"]), "num_classes": int(layout["K"]),
                  "soft_targets": len(layout["targets"]) == 1}
    manifest = {**info, "shards": shards, "total": start, "layout": layout, "finalized": time.time(),
                "versions": _versions()}
    path = os.path.join(out_dir, "manifest.json")
    _atomic_write_json(path, manifest)
    return path


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
