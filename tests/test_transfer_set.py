"""Transfer sets: round trip, crash + resume, corruption detection, PNG export, figures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dfkd_fast.models import build_model
from dfkd_fast.transfer_set import TransferSet, TransferSetWriter, add_to_manifest, export_png, teacher_fingerprint
from dfkd_fast.transfer_set.manifest import write_manifest
from dfkd_fast.viz import save_curves, save_grid

META = {"method": "test", "hparams": {"lr": 0.1}}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU workloads run fastest single-threaded on a shared machine; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def batch(seed: int, n: int = 5, c: int = 1, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, 6, 6, generator=g), torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)


def test_round_trip_uint8_and_fp16(tmp_path):
    for store in ("uint8", "fp16"):
        out = tmp_path / store
        w = TransferSetWriter(out, META, shard_size=4, store=store, teacher=build_model("lenet5", in_channels=1))
        xs, ss, ts = [], [], []
        for s in range(3):
            x, sl, t = batch(s)
            w.add(x, sl, t, seed=s)
            xs.append(x), ss.append(sl), ts.append(t)
        assert w.num_images == 15 and w.num_committed == 12  # 3 full shards, 3 buffered
        w.close()
        ds = TransferSet(out, verify=True)
        assert len(ds) == 15
        man = json.loads((out / "manifest.json").read_text())
        assert [s["count"] for s in man["shards"]] == [4, 4, 4, 3] and man["total"] == 15
        assert man["meta"]["method"] == "test" and len(man["meta"]["teacher"]) == 64
        assert man["layout"] == {"image_shape": [1, 6, 6], "num_classes": 4, "soft_targets": False}
        assert "torch" in man["versions"]
        atol = 0.5 / 255 + 1e-6 if store == "uint8" else 1e-3
        torch.testing.assert_close(ds.images(), torch.cat(xs), atol=atol, rtol=0)
        torch.testing.assert_close(ds.soft_labels(), torch.cat(ss))
        assert torch.equal(ds.targets(), torch.cat(ts))
        assert ds.seeds().tolist() == [0] * 5 + [1] * 5 + [2] * 5
        img, sl, tgt = ds[-1]
        assert img.shape == (1, 6, 6) and sl.shape == (4,) and int(tgt) == int(ts[-1][-1])
        with pytest.raises(IndexError):
            ds[15]


def test_writer_refuses_existing_and_bad_input(tmp_path):
    w = TransferSetWriter(tmp_path, META, shard_size=2)
    x, s, t = batch(0)
    with pytest.raises(ValueError, match=r"soft_labels must be \(N=5, K\)"):
        w.add(x, s[:3], t)
    w.add(x, s, t)
    with pytest.raises(ValueError, match="layout"):
        w.add(torch.rand(2, 3, 6, 6), torch.randn(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        w.add(x * float("nan"), s)
    with pytest.raises(ValueError, match="pass resume=True"):
        TransferSetWriter(tmp_path, META, shard_size=2)
    with pytest.raises(ValueError, match="differs in"):
        TransferSetWriter(tmp_path, {"method": "other"}, shard_size=2, resume=True)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TransferSet(tmp_path)


def test_resume_after_crash(tmp_path):
    n_batches = 7
    w = TransferSetWriter(tmp_path, META, shard_size=4)
    for b in range(4):
        w.add(*batch(b), seed=b)
    assert w.num_committed == 20
    del w  # SIGKILL-like: no close(), 0 images buffered here but shards 0..4 committed
    # a torn temp file and an uncommitted shard (renamed but no journal line) from the crash
    (tmp_path / "shard-000-000005.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "shard-000-000005.safetensors").write_bytes((tmp_path / "shard-000-000000.safetensors").read_bytes())
    with open(tmp_path / "journal-000.jsonl", "ab") as f:
        f.write(b'{"index": 5, "fi')  # torn journal line
    w = TransferSetWriter(tmp_path, META, shard_size=4, resume=True)
    assert not list(tmp_path.glob("*.tmp"))
    assert not (tmp_path / "shard-000-000005.safetensors").exists()
    assert w.num_images == 20 and w.num_shards == 5
    for b in range(w.num_images // 5, n_batches):  # the caller continues from the durable count
        w.add(*batch(b), seed=b)
    w.close()
    ds = TransferSet(tmp_path, verify=True)
    assert len(ds) == 5 * n_batches
    expect = torch.cat([batch(b)[0] for b in range(n_batches)])
    torch.testing.assert_close(ds.images(), expect, atol=0.5 / 255 + 1e-6, rtol=0)
    imgs = ds.images().flatten(1)
    assert len({tuple(r.tolist()) for r in imgs}) == 5 * n_batches  # no duplicates
    assert ds.seeds().tolist() == [b for b in range(n_batches) for _ in range(5)]


def indexed(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels encode their global index (index / 255), so order and duplicates are checkable."""
    idx = torch.arange(start, start + n)
    return (idx.float() / 255).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(), torch.randn(n, 3)


def test_resume_after_sigkill(tmp_path):
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_transfer_set import indexed
        from dfkd_fast.transfer_set import TransferSetWriter
        w = TransferSetWriter({str(tmp_path)!r}, {{"method": "kill"}}, shard_size=3)
        i = 0
        while True:
            w.add(*indexed(i, 5), seed=i)
            i += 5
            print(w.num_committed, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        for line in proc.stdout:
            if int(line) >= 30 or time.time() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    total = 120
    w = TransferSetWriter(tmp_path, {"method": "kill"}, shard_size=3, resume=True)
    assert 30 <= w.num_images < total and w.num_images % 3 == 0
    while w.num_images < total:
        i = w.num_images
        w.add(*indexed(i, min(5, total - i)), seed=i)
    w.close()
    ds = TransferSet(tmp_path, verify=True)
    got = (ds.images()[:, 0, 0, 0] * 255).round().long()
    assert got.tolist() == list(range(total))  # every image exactly once, in order


def test_resume_with_state_rolls_back_to_state(tmp_path):
    w = TransferSetWriter(tmp_path, META, shard_size=100)
    w.add(*batch(0), seed=0)
    w.state = {"step": torch.tensor(1), "bank": torch.ones(3)}  # commits the short shard, then the state
    w.add(*batch(1), seed=1)
    w.flush()  # committed, but the crash comes before the next state save
    assert w.num_shards == 2
    del w
    w = TransferSetWriter(tmp_path, META, shard_size=100, resume=True)
    assert w.num_images == 5 and w.num_shards == 1  # rolled back to the state point
    assert int(w.state["step"]) == 1 and torch.equal(w.state["bank"], torch.ones(3))
    w.add(*batch(1), seed=1)
    w.close()
    assert len(TransferSet(tmp_path)) == 10


def test_stateful_resume_without_state_restarts(tmp_path):
    w = TransferSetWriter(tmp_path, META, shard_size=2, stateful=True)
    w.add(*batch(0))  # two shards committed, crash before the first state save
    assert w.num_shards == 2
    del w
    w = TransferSetWriter(tmp_path, META, shard_size=2, stateful=True, resume=True)
    assert w.num_images == 0 and w.state is None and not list(tmp_path.glob("shard-*"))


def test_corrupted_shard_is_named(tmp_path):
    w = TransferSetWriter(tmp_path, META, shard_size=3)
    for b in range(2):
        w.add(*batch(b), seed=b)
    w.close()
    p = tmp_path / "shard-000-000001.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    TransferSet(tmp_path)  # no verification: opening is cheap
    with pytest.raises(ValueError, match="shard-000-000001.safetensors is corrupted"):
        TransferSet(tmp_path, verify=True)
    with pytest.raises(ValueError, match="shard-000-000001.safetensors is corrupted"):
        TransferSetWriter(tmp_path, META, shard_size=3, resume=True)


def test_multi_rank_manifest(tmp_path):
    ws = [TransferSetWriter(tmp_path, META, shard_size=4, rank=r, world_size=2) for r in range(2)]
    for r, w in enumerate(ws):
        w.add(*batch(10 + r), seed=10 + r)
    assert ws[1].close() is None
    ws[0].close(finalize=True)
    ds = TransferSet(tmp_path, verify=True)
    assert len(ds) == 10
    assert ds.seeds().tolist() == [10] * 5 + [11] * 5


def test_export_png_and_figures(tmp_path):
    w = TransferSetWriter(tmp_path / "ts", META, shard_size=4)
    x, s, t = batch(0, n=6, c=3)
    w.add(x, s, t)
    w.close()
    n = export_png(tmp_path / "ts", tmp_path / "png")
    assert n == 6
    pngs = sorted((tmp_path / "png").rglob("*.png"))
    assert len(pngs) == 6
    assert {p.parent.name for p in pngs} == {f"{int(c):02d}" for c in s.argmax(1)}
    from PIL import Image

    im = Image.open(pngs[0])
    assert im.size == (6, 6) and im.mode == "RGB"
    out = save_grid(x, tmp_path / "grid.png", probs=s.softmax(1), nrow=3, class_names=list("abcd"))
    assert os.path.getsize(out) > 0 and open(out, "rb").read(4) == b"\x89PNG"
    save_grid(x, s, tmp_path / "grid2.png")  # ARCHITECTURE.md argument order
    assert (tmp_path / "grid2.png").exists()
    save_curves({"loss": [3.0, 2.0, 1.5], "acc": [0.1, 0.5, 0.7]}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="curves is empty"):
        save_curves({}, tmp_path / "d.png")


def test_teacher_fingerprint_changes_with_weights():
    m = build_model("lenet5", in_channels=1)
    f = teacher_fingerprint(m)
    assert f == teacher_fingerprint(m.state_dict())
    with torch.no_grad():
        m.fc.bias[0] += 1
    assert teacher_fingerprint(m) != f


@pytest.mark.parametrize("edit, match", [
    (lambda m: (m["shards"].append(dict(m["shards"][0], start=m["total"])), m.update(total=m["total"] + 4)),
     "lists shard 'shard-000-000000.safetensors' twice"),  # a shard listed twice: 44 images from a 40-image set
    (lambda m: m["shards"][1].update(file="../outside.safetensors"), "not a file of this set"),
    (lambda m: m["shards"][1].update(file="/etc/passwd"), "not a file of this set"),
    (lambda m: m["shards"][2].update(start=0), "expected start 8"),
    (lambda m: m.update(total=m["total"] - 1), "total=39 but its shards hold 40"),
])
def test_edited_manifest_is_refused(tmp_path, edit, match):
    w = TransferSetWriter(tmp_path, META, shard_size=4)
    for b in range(8):
        w.add(*batch(b), seed=b)
    w.close()
    mpath = tmp_path / "manifest.json"
    assert len(TransferSet(tmp_path)) == 40
    man = json.loads(mpath.read_text())
    edit(man)
    mpath.write_text(json.dumps(man))
    # a hand edit breaks the manifest's own checksum: refused with one line naming the file
    with pytest.raises(ValueError, match="manifest.json does not match its manifest_sha256") as e:
        TransferSet(tmp_path)
    assert str(mpath) in str(e.value) and "\n" not in str(e.value)
    # an edited manifest with a recomputed checksum (e.g. a buggy tool) still fails the shard-list checks
    write_manifest(str(mpath), man)
    with pytest.raises(ValueError, match=match):
        TransferSet(tmp_path)
    with pytest.raises(ValueError, match=match):
        TransferSet(tmp_path, verify=False)


def test_manifest_checksum_refuses_any_edit(tmp_path):
    """Edits the shard-list checks cannot see (a meta value, a shard's sha256, a deleted checksum field) are
    refused by the manifest's checksum; add_to_manifest keeps it valid; format-1 manifests stay readable."""
    w = TransferSetWriter(tmp_path, META, shard_size=4)
    w.add(*batch(0), seed=0)
    w.close()
    mpath = tmp_path / "manifest.json"
    add_to_manifest(str(mpath), {"summary": {"images": 5}})
    good = json.loads(mpath.read_text())
    assert good["format_version"] == 2 and len(good["manifest_sha256"]) == 64
    assert TransferSet(tmp_path).manifest["summary"] == {"images": 5}
    for edit in (lambda m: m["meta"].update(method="other"), lambda m: m["shards"][0].update(sha256="0" * 64),
                 lambda m: m.pop("manifest_sha256"), lambda m: m.update(total=5.0)):
        man = json.loads(json.dumps(good))
        edit(man)
        mpath.write_text(json.dumps(man))
        with pytest.raises(ValueError, match=f"{mpath} does not match its manifest_sha256"):
            TransferSet(tmp_path)
    mpath.write_text("{not json")
    with pytest.raises(ValueError, match=f"{mpath} is not valid JSON"):
        TransferSet(tmp_path)
    old = {k: v for k, v in good.items() if k != "manifest_sha256"}
    mpath.write_text(json.dumps(dict(old, format_version=1)))  # a format-1 set: no checksum to check
    assert len(TransferSet(tmp_path)) == 5
