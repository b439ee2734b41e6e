"""Transfer-set files (SPEC §7, §8): format constants, checksums, atomic writes, the manifest merge.

``manifest.json`` is written last (temp file + rename): :func:`finalize_manifest` merges ``meta.json`` and
every rank's ``done-{rank:03d}.json``; :func:`add_to_manifest` adds top-level keys (the run's summary).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "FORMAT_VERSION", "sha256_file", "teacher_fingerprint", "finalize_manifest", "add_to_manifest"]

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



def add_to_manifest(path: str, extra: dict[str, Any]) -> None:
    """Add top-level keys to a finished ``manifest.json`` (atomic rewrite)."""
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(extra)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
