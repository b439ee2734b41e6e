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

__all__ = ["FORMAT", "FORMAT_VERSION", "sha256_file", "teacher_fingerprint", "finalize_manifest", "add_to_manifest",
           "manifest_checksum", "write_manifest", "read_manifest", "LOGITS_KEY", "OLD_LOGITS_KEY", "logits_key"]

FORMAT = "dfkd_fast.transfer_set"
#: 2: ``manifest.json`` carries ``manifest_sha256`` and shards store the logits as ``teacher_logits``
#: (version 1 sets -- no checksum, ``soft_labels`` -- stay readable).
FORMAT_VERSION = 2
CHECKSUM_KEY = "manifest_sha256"
LOGITS_KEY = "teacher_logits"
OLD_LOGITS_KEY = "soft_labels"


def logits_key(keys: Any) -> str:
    """The name under which a shard stores the teacher logits: ``teacher_logits``, or ``soft_labels`` (format 1)."""
    return LOGITS_KEY if LOGITS_KEY in keys else OLD_LOGITS_KEY


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, compact separators) without ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(path: str, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest`` to ``path`` atomically with its ``manifest_sha256`` (see :func:`manifest_checksum`)."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != CHECKSUM_KEY}, default=str))
    body[CHECKSUM_KEY] = manifest_checksum(body)
    _atomic_write_json(path, body)


def read_manifest(path: str) -> dict[str, Any]:
    """Read ``manifest.json``; a file that is not JSON, or whose ``manifest_sha256`` does not match its content
    (hand-edited or damaged), raises ``ValueError`` naming the file. Format-1 manifests have no checksum."""
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the transfer set's manifest is damaged -- rewrite it "
                         "with TransferSetWriter(..., resume=True) then close(), or restore it") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a transfer-set manifest (a JSON object was expected)")
    if CHECKSUM_KEY in manifest or int(manifest.get("format_version", 1) or 1) >= 2:
        if manifest.get(CHECKSUM_KEY) != manifest_checksum(manifest):
            raise ValueError(f"{path} does not match its manifest_sha256: the manifest was edited or damaged -- "
                             "rewrite it with TransferSetWriter(..., resume=True) then close(), or restore it")
    return manifest


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

def _read_json(path: str) -> Any:
    """``json.load`` of ``path``; a damaged file raises ``ValueError`` naming it."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); restore it or start a new transfer set") from None


def finalize_manifest(out_dir: str | os.PathLike) -> str:
    """Merge ``meta.json`` and every rank's ``done-*.json`` into ``manifest.json`` (atomic). Returns its path."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    meta_path = os.path.join(out_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"finalize_manifest: {meta_path} not found; is {out_dir} a transfer set?")
    info = _read_json(meta_path)
    ws = int(info.get("world_size", 1))
    shards: list[dict[str, Any]] = []
    layout = None
    missing = []
    for r in range(ws):
        p = os.path.join(out_dir, f"done-{r:03d}.json")
        if not os.path.isfile(p):
            missing.append(r)
            continue
        done = _read_json(p)
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
    write_manifest(path, manifest)
    return path



def add_to_manifest(path: str, extra: dict[str, Any]) -> None:
    """Add top-level keys to a finished ``manifest.json`` (checked, then rewritten atomically with a new checksum)."""
    manifest = read_manifest(path)
    manifest.update(extra)
    write_manifest(path, manifest)
