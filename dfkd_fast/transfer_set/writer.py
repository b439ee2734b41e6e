"""Writing a transfer set: :class:`TransferSetWriter` (sharded, checksummed, atomic, resumable) and
:func:`write_tensors`. The directory layout and the commit / resume protocol are described in
:mod:`dfkd_fast.transfer_set`.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dfkd_fast import comm
from dfkd_fast.transfer_set.manifest import (
    FORMAT,
    FORMAT_VERSION,
    LOGITS_KEY,
    _atomic_write_bytes,
    _atomic_write_json,
    _fsync_dir,
    _jsonable,
    _read_json,
    _versions,
    finalize_manifest,
    logits_key,
    sha256_file,
    teacher_fingerprint,
)

__all__ = ["TransferSetWriter", "write_tensors", "kill_point", "KILL_ENV"]

#: Test hook: ``DFKD_FAST_TEST_KILL_AT=<point>[@<n>]`` SIGKILLs this process the n-th time (default 1st) it passes
#: the named point. Points: ``shard-written`` (shard file in place, no state, no journal line), ``state-written``
#: (state saved with the shard, journal line not yet written), ``shard-committed`` (journal line written).
KILL_ENV = "DFKD_FAST_TEST_KILL_AT"
_UNSET: Any = object()
_passes: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``$DFKD_FAST_TEST_KILL_AT`` names this point (and pass count); else no-op."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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
                old = _read_json(meta_path)
                diff = sorted(k for k in set(old) | set(info)
                              if k not in ("created", "versions", "format_version") and old.get(k) != info.get(k))
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
            if n_state == len(entries) + 1 and self._pending_ok(saved.get("pending"), len(entries)):
                entries.append(dict(saved["pending"]))  # killed between the state save and the journal line
                self._rewrite_journal(entries)
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
                lk = logits_key(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()[1:]) for k in ("images", lk, "targets")}
            self._layout = {"images": shapes["images"], "K": shapes[lk][0], "targets": shapes["targets"]}

    def _pending_ok(self, pending: Any, index: int) -> bool:
        """Whether the state's pending shard record (saved just before its journal line) is shard ``index`` and
        its file is intact: then the shard is committed now instead of being regenerated."""
        if not isinstance(pending, dict) or pending.get("index") != index:
            return False
        p = os.path.join(self.out_dir, str(pending.get("file", "")))
        return (pending.get("file") == f"shard-{self.rank:03d}-{index:06d}.safetensors" and os.path.isfile(p)
                and sha256_file(p) == pending.get("sha256"))

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
            seed: int = 0, state: Any = _UNSET) -> None:
        """Buffer a batch and commit every full shard.

        With ``state`` given, the whole buffer is committed now (a short shard if needed) and ``state`` is saved
        *with* the last shard -- after its file, before its journal line -- so a committed shard always has the
        state that follows it (same as ``writer.state = state`` after ``add``, but crash-safe in between).

        Args:
            images: (N, C, H, W) float in [0, 1] (clamped; stored as round(255 x) for ``store="uint8"``).
            soft_labels: (N, K) teacher logits or probabilities (see ``soft_kind``).
            targets: (N,) int64 hard targets, (N, K) soft targets used in synthesis, or None (argmax of
                soft_labels is stored).
            seed: the seed that produced this batch (stored per image).
            state: synthesizer state to save with the commit (see :attr:`state`).
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
                          LOGITS_KEY: soft.to(torch.float16 if self.soft_dtype == "fp16" else torch.float32),
                          "targets": tgt.contiguous(), "seeds": torch.full((n,), int(seed), dtype=torch.int64)})
        self._buffered += n
        if state is _UNSET:
            self.flush(partial=False)
        else:
            self.flush(partial=True, state=state)

    def flush(self, partial: bool = True, state: Any = _UNSET) -> None:
        """Commit full shards from the buffer; with ``partial=True`` also the remainder as a short shard.
        ``state`` (if given) is saved with the last shard committed, or alone when nothing is buffered."""
        bounds: list[tuple[int, int]] = []
        pos = 0
        while self._buffered - pos >= self.shard_size or (partial and self._buffered > pos):
            take = min(self.shard_size, self._buffered - pos)
            bounds.append((pos, pos + take))
            pos += take
        if bounds:
            cat = {k: torch.cat([b[k] for b in self._buf]) for k in self._buf[0]}
            for i, (lo, hi) in enumerate(bounds):
                self._commit({k: v[lo:hi].contiguous() for k, v in cat.items()},
                             state if i == len(bounds) - 1 else _UNSET)
                self._buffered -= hi - lo
                self._buf = [{k: v[hi:] for k, v in cat.items()}] if self._buffered else []
        elif state is not _UNSET:
            self._save_state(state, None)

    def _commit(self, tensors: dict[str, torch.Tensor], state: Any = _UNSET) -> None:
        """Shard file (temp + fsync + rename), then ``state`` if given (recording this shard as ``pending``), then
        the journal line: the commit point. A crash before the journal line leaves the shard uncommitted (resume
        deletes it), unless the state naming it was saved, in which case resume commits it."""
        from safetensors.torch import save_file

        index = len(self._entries)
        name = f"shard-{self.rank:03d}-{index:06d}.safetensors"
        path = os.path.join(self.out_dir, name)
        tmp = path + ".tmp"
        count = int(tensors["images"].shape[0])
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "rank": str(self.rank), "index": str(index),
                                              "count": str(count), "store": self.store})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:  # disk full surfaces as SafetensorError: report it as the OSError it is
            _remove_quietly(tmp)
            raise OSError(f"cannot write shard {tmp} ({type(e).__name__}: {e}); free disk space in "
                          f"{self.out_dir} and resume") from e
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(self.out_dir)
        kill_point("shard-written")
        entry = {"index": index, "file": name, "count": count, "sha256": digest, "start": self.num_committed,
                 "rank": self.rank}
        if state is not _UNSET:
            self._save_state(state, entry)
            kill_point("state-written")
        with open(self._journal, "ab") as f:
            f.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self._entries.append(entry)
        kill_point("shard-committed")

    def _save_state(self, value: Any, pending: dict[str, Any] | None) -> None:
        """Save ``value`` atomically as the state after the committed shards (plus ``pending``, if given)."""
        n_shards = len(self._entries) + (pending is not None)
        n_images = self.num_committed + (int(pending["count"]) if pending is not None else 0)
        payload = {"state": value, "num_shards": n_shards, "num_images": n_images, "pending": pending}
        tmp = self._state_path + ".tmp"
        try:
            torch.save(payload, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:  # disk full: torch reports "[enforce fail at inline_container.cc]"
            _remove_quietly(tmp)
            raise OSError(f"cannot write synthesizer state {tmp} ({type(e).__name__}: {str(e).splitlines()[0]});"
                          f" free disk space in {self.out_dir} and resume") from e
        os.replace(tmp, self._state_path)
        _fsync_dir(self.out_dir)
        self._state = value

    @property
    def state(self) -> Any:
        """The last saved synthesizer state (restored by ``resume=True``), or None."""
        return self._state

    @state.setter
    def state(self, value: Any) -> None:
        """Commit the buffer, saving ``value`` (tensors / dicts / lists / numbers) atomically with the last shard
        (before its journal line), or alone when nothing is buffered."""
        self.flush(partial=True, state=value)

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



def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_tensors(out: str, images: torch.Tensor, logits: torch.Tensor, meta: dict[str, Any],
                  shard_size: int = 4096, collective: bool = False) -> str:
    """Write in-memory images (uint8, or float in [0, 1]) and teacher logits as a transfer set at ``out``.

    With ``collective=True`` every rank of the process group (``dfkd_fast.comm``) calls it with its own
    images and writes them as its shards of ONE set: rank 0 opens the set first, all ranks write, rank 0
    writes the manifest after a barrier. For one process both forms are the same.

    Shape: images (N, C, H, W), logits (N, K); N may be 0 on some ranks (collective).
    """
    if images.shape[0] != logits.shape[0]:
        raise ValueError(f"images and logits must be equally many, got {images.shape[0]} and {logits.shape[0]}")
    r, world = (comm.rank(), comm.world_size()) if collective else (0, 1)
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    meta = dict(meta)
    if not collective:
        meta["num_images"] = int(x.shape[0])
    meta.update(num_classes=int(logits.shape[1]), image_size=list(x.shape[1:]))

    def open_writer() -> TransferSetWriter:
        return TransferSetWriter(out, meta, shard_size=shard_size, store="uint8", soft_kind="logits", rank=r,
                                 world_size=world)

    writer = open_writer() if r == 0 else None  # rank 0 first: it writes meta.json
    comm.barrier()
    writer = writer or open_writer()
    for i in range(0, x.shape[0], shard_size):
        lg = logits[i:i + shard_size].float().cpu()
        writer.add(x[i:i + shard_size].cpu(), lg, lg.argmax(1))
    writer.close(finalize=False)
    comm.barrier()
    if r == 0:
        finalize_manifest(out)
    comm.barrier()
    return out
