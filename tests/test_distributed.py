"""Multi-process synthesis on torch.distributed: gloo, 2 CPU processes, tiny sizes (issue 5).

Workers are started with the ``spawn`` start method and join a ``file://`` process group; one test runs the
real ``python -m torch.distributed.run`` command line. Teacher: a seeded 3x8x8 BatchNorm net with K = 4;
generators with nz = 16, ngf = 8, two inner steps.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dfkd_fast.distributed import (
    all_gather_rows,
    all_reduce_mean_,
    init_distributed,
    module_checksum,
    rank_plan,
    run_distributed_synthesis,
    torchrun_clashes,
    torchrun_option_strings,
)
from dfkd_fast.runner import batch_seed, run_synthesis
from dfkd_fast.synthesis import build_synthesizer
from dfkd_fast.transfer_set import TransferSet

TESTS = os.path.dirname(os.path.abspath(__file__))
K, IMG, B = 4, (3, 8, 8), 2
TINY = {"nz": 16, "ngf": 8, "iterations": 2}
CMI_HP = {**TINY, "bank_size": 64, "n_neg": 8, "head_dim": 8}
META_HP = {**TINY, "warmup": 0}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _synth(method: str, hp: dict, **kw):
    return build_synthesizer(method, _teacher(), K, IMG, batch_size=B, device="cpu", backend="torch", seed=0,
                             **hp, **kw)


def _image_hashes(ts: TransferSet) -> list[str]:
    from safetensors.torch import load_file

    out = []
    for s in ts.manifest["shards"]:
        imgs = load_file(os.path.join(ts.path, s["file"]))["images"]
        out += [hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in imgs]
    return out


# ----------------------------------------------------------------------------- worker jobs (run in each rank)
def _job_cmi(rank: int, out: str, n: int) -> dict:
    synth = _synth("cmi", CMI_HP)
    ctx = init_distributed("cpu")
    summary = run_distributed_synthesis(synth, out, n, ctx=ctx, shard_size=B, preview=0, progress=False, seed=3)
    local, global_ = synth.bank.entries()
    return {"bank": module_checksum([local, global_]), "bank_len": len(synth.bank), "calls": synth.batches_done,
            "summary": summary.extra["distributed"], "images": summary.images}


def _job_online(rank: int, out: str, rounds: int) -> dict:
    from dfkd_fast.tasks.distill import distill_online

    synth = _synth("fast_meta", META_HP)
    meta_init = module_checksum(synth.netG)
    torch.manual_seed(100 + rank)  # different initial students: DDP must broadcast rank 0's
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, K))
    init = module_checksum(student)
    res = distill_online(student, synth.teacher, synth, rounds=rounds, kd_steps_per_round=2, lr=0.05, T=4.0,
                   batch_size=4, augment=False, backend="torch", seed=rank, progress=False, out_dir=out,
                         save_pool=True)
    assert res.images == rounds * B and synth.distributed  # the meta-gradient all-reduce was installed
    return {"student_init": init, "student": module_checksum(student), "meta_init": meta_init,
            "meta": module_checksum(synth.netG)}


def _job_kill(rank: int, out: str, n: int, die_at: int, resume: bool) -> dict:
    synth = _synth("cmi", CMI_HP)
    inner = synth.synthesize
    calls = [0]

    def synthesize(*a, **kw):
        calls[0] += 1
        if rank == 1 and calls[0] == die_at:
            os.kill(os.getpid(), signal.SIGKILL)  # this rank dies mid-run, after committing earlier shards
        return inner(*a, **kw)

    synth.synthesize = synthesize
    summary = run_distributed_synthesis(synth, out, n, ctx=init_distributed("cpu"), shard_size=B, preview=0,
                                        progress=False, seed=7, resume=resume)
    local, global_ = synth.bank.entries()
    return {"bank": module_checksum([local, global_]), "images": summary.images}


def _job_comm(rank: int) -> dict:
    from dfkd_fast import comm

    rows = comm.all_gather_rows(torch.full((rank + 1, 2), float(rank)))  # unequal row counts: 1 and 2
    a = torch.full((2, 3), float(rank + 1))
    b = torch.full((4,), 10.0 * (rank + 1), dtype=torch.float64)
    comm.all_reduce_mean_([a, None, b])  # mixed dtypes, a None gradient
    t = [torch.full((2,), float(rank)), torch.full((3,), rank, dtype=torch.int64)]
    comm.broadcast_tensors_(t, src=1)
    obj = comm.broadcast_object({"from": rank}, src=0)
    return {"rows": rows.tolist(), "a": a.tolist(), "b": b.tolist(), "t": [x.tolist() for x in t], "obj": obj,
            "rank": comm.rank(), "world": comm.world_size()}


JOBS = {"cmi": _job_cmi, "online": _job_online, "kill": _job_kill, "comm": _job_comm}


def _worker(rank: int, world: int, init_file: str, result_dir: str, job: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = JOBS[job](rank, *args)
        with open(os.path.join(result_dir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
    except BaseException:
        with open(os.path.join(result_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(tmp, job: str, *args, world: int = 2, timeout: float = 90.0,
           expect_death: int | None = None) -> list[dict]:
    """Run ``job`` on ``world`` spawned ranks; returns each rank's result (or kills all if one dies)."""
    run_dir = tmp / f"run-{job}-{time.monotonic_ns()}"
    run_dir.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(run_dir / "pg"), str(run_dir), job, args))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.is_alive() for p in procs):
        if expect_death is not None and not procs[expect_death].is_alive():
            time.sleep(1.0)  # a dead peer: end the others as torchrun's agent would
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    if expect_death is not None:
        assert procs[expect_death].exitcode == -signal.SIGKILL
        return []
    errs = [(run_dir / f"{r}.err") for r in range(world) if (run_dir / f"{r}.err").exists()]
    assert not errs, "\n".join(e.read_text() for e in errs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [json.loads((run_dir / f"{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------------------- tests
def test_rank_plan_disjoint_and_complete():
    for n, b, w in ((10, 2, 2), (7, 3, 4), (1, 4, 3), (64, 8, 3)):  # uneven, more ranks than batches, ...
        plans = rank_plan(n, b, w)
        assert sum(p.images for p in plans) == n
        starts = [p.first_batch for p in plans]
        assert starts == sorted(starts) and plans[0].first_batch == 0
        assert all(a.first_batch + a.batches == c.first_batch for a, c in zip(plans, plans[1:], strict=False))
        assert all(p.images <= p.batches * b for p in plans)
    with pytest.raises(ValueError, match="num_images"):
        rank_plan(0, 2, 2)


def test_single_process_collectives_are_identity(monkeypatch):
    t = torch.randn(3, 2)
    assert all_gather_rows(t) is t
    u = t.clone()
    all_reduce_mean_([u])
    assert torch.equal(u, t)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        init_distributed("cpu")


def test_comm_collectives_on_two_ranks(tmp_path):
    res = _spawn(tmp_path, "comm")
    for r, got in enumerate(res):
        assert got["rank"] == r and got["world"] == 2
        assert got["rows"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]  # rank order, counts kept
        assert got["a"] == [[1.5] * 3] * 2 and got["b"] == [15.0] * 4  # means, each dtype on its own
        assert got["t"] == [[1.0, 1.0], [1, 1, 1]]  # rank 1's tensors everywhere
        assert got["obj"] == {"from": 0}


def test_one_process_is_world_size_one_of_the_same_loop(tmp_path):
    """run_synthesis without a context and with a 1-rank context write identical sets; only the summary's
    ``extra["distributed"]`` differs. The hooks are no-ops for one process."""
    from dfkd_fast.distributed import SHARED_STATE, DistContext, enable_distributed

    plain = run_synthesis(_synth("cmi", CMI_HP), str(tmp_path / "a"), 6, shard_size=B, preview=0, progress=False,
                          seed=4)
    ranked = run_synthesis(_synth("cmi", CMI_HP), str(tmp_path / "b"), 6, ctx=DistContext.local("cpu"),
                           shard_size=B, preview=0, progress=False, seed=4)
    a, b = TransferSet(str(tmp_path / "a"), verify=True), TransferSet(str(tmp_path / "b"), verify=True)
    assert torch.equal(a.images(), b.images()) and torch.equal(a.seeds(), b.seeds())
    assert a.seeds().tolist() == [batch_seed(4, i // B) for i in range(6)]
    assert set(plain.extra) <= {"health"} and ranked.extra["distributed"]["world_size"] == 1
    assert plain.class_histogram == ranked.class_histogram and plain.images == ranked.images == 6
    synth = _synth("fast_meta", META_HP)
    state = synth.state_dict()
    assert enable_distributed(synth) is False and synth.distributed  # installed, but nothing to talk to
    synth.share_state(0)
    assert module_checksum(synth.netG) == module_checksum(_synth("fast_meta", META_HP).netG)
    assert state["generator"].keys() == synth.state_dict()["generator"].keys()
    assert SHARED_STATE == {"cmi": ("bank",), "fast_meta": ("generator", "meta_optimizer")}
    assert _synth("deep_inversion", {"iterations": 1}).setup_comm() is False


def test_no_flag_is_taken_by_torchrun():
    from dfkd_fast.cli import all_flags

    options = torchrun_option_strings()
    assert "--numa-binding" in options and "--nproc-per-node" in options  # really torchrun's own parser
    # negative control: these would be swallowed or rejected by torchrun's abbreviation matching
    bad = {f for f, _ in torchrun_clashes(["--num", "--nproc", "--rdzv", "--num-images"])}
    assert bad == {"--num", "--nproc", "--rdzv"}
    flags = [f for f in all_flags() if f != "--help"]  # argparse's --help: an exact torchrun option, passed on
    assert len(flags) > 30
    assert torchrun_clashes(flags) == []
    assert not [c for c in torchrun_clashes(["--help"]) if c[1].startswith("torch")]


def test_two_rank_cmi_run_writes_disjoint_shards_and_shares_the_bank(tmp_path):
    n = 10  # 5 batches of 2: ranks take 2 and 3 batches; rank 0 makes a filler call to stay in lockstep
    out = str(tmp_path / "ts2")
    res = _spawn(tmp_path, "cmi", out, n)
    ts = TransferSet(out, verify=True)
    assert len(ts) == n and ts.manifest["world_size"] == 2 and ts.manifest["total"] == n
    files = [s["file"] for s in ts.manifest["shards"]]
    assert len(files) == len(set(files)) == 5
    assert {f.split("-")[1] for f in files} == {"000", "001"}
    assert len({s["sha256"] for s in ts.manifest["shards"]}) == 5
    hashes = _image_hashes(ts)
    assert len(hashes) == len(set(hashes)) == n  # exactly N distinct images
    want = {batch_seed(3, b, r) for r, p in enumerate(rank_plan(n, B, 2)) for b in range(p.batches)}
    assert set(ts.seeds().tolist()) == want  # every rank's batches seeded from (seed, b, rank)
    # the shared memory bank: both ranks hold the same entries, from all ranks' batches (+ the filler)
    assert res[0]["bank"] == res[1]["bank"]
    assert res[0]["calls"] == res[1]["calls"] == 3
    assert res[0]["bank_len"] == 2 * 3 * B
    per = ts.manifest["summary"]["extra"]["distributed"]["per_rank"]
    assert [p["images"] for p in per] == [4, 6] and all(p["images_per_s"] > 0 for p in per)
    # a 1-rank run of the same request writes the same number of images
    one = run_synthesis(_synth("cmi", CMI_HP), str(tmp_path / "ts1"), n, shard_size=B, preview=0, progress=False)
    assert one.images == len(TransferSet(str(tmp_path / "ts1"))) == n == res[0]["images"]


def test_online_fast_meta_ddp_ranks_stay_identical(tmp_path):
    """FastMeta + DDP student, 3 rounds: one meta generator and one student across ranks."""
    out = str(tmp_path / "online")
    rounds = 3
    res = _spawn(tmp_path, "online", out, rounds)
    assert res[0]["meta_init"] == res[1]["meta_init"]
    assert res[0]["meta"] == res[1]["meta"] != res[0]["meta_init"]  # meta-gradients averaged, meta steps moved it
    assert res[0]["student_init"] != res[1]["student_init"]
    assert res[0]["student"] == res[1]["student"] != res[0]["student_init"]  # DDP: synchronized updates
    ts = TransferSet(os.path.join(out, "transfer_set"), verify=True)  # both ranks' pools, one set
    assert len(ts) == 2 * rounds * B and {s["file"].split("-")[1] for s in ts.manifest["shards"]} == {"000", "001"}
    assert len(set(_image_hashes(ts))) == 2 * rounds * B  # ranks synthesized from different latents
    assert os.path.isfile(os.path.join(out, "student.safetensors"))


def test_kill_one_rank_then_resume_completes_without_duplicates(tmp_path):
    n = 14  # 7 batches: rank 0 takes 3, rank 1 takes 4
    out = str(tmp_path / "killed")
    _spawn(tmp_path, "kill", out, n, 3, False, expect_death=1)  # rank 1 dies in its 3rd batch
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    for r in (0, 1):
        with open(os.path.join(out, f"journal-{r:03d}.jsonl")) as f:
            assert sum(1 for line in f if line.strip()) == 2  # both committed 2 shards before the crash
    res = _spawn(tmp_path, "kill", out, n, 0, True)
    ts = TransferSet(out, verify=True)
    assert len(ts) == n
    files = [s["file"] for s in ts.manifest["shards"]]
    assert len(files) == len(set(files)) == 7
    hashes = _image_hashes(ts)
    assert len(set(hashes)) == n
    seeds = ts.seeds().tolist()
    want = [batch_seed(7, b, r) for r, p in enumerate(rank_plan(n, B, 2)) for b in range(p.batches)]
    assert sorted(seeds) == sorted(s for s in want for _ in range(B))  # none lost, none duplicated
    assert res[0]["bank"] == res[1]["bank"]


def test_real_torchrun_command_line(tmp_path):
    torch.manual_seed(0)
    sys.path.insert(0, TESTS)
    try:
        from cli_models import tiny_bn_cnn
    finally:
        sys.path.remove(TESTS)
    weights = str(tmp_path / "t.pt")
    torch.save(tiny_bn_cnn(10, 1, 8).state_dict(), weights)
    out = str(tmp_path / "tr")
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dfkd_fast", "synthesize", "--teacher", "cli_models:tiny_bn_cnn", "--weights", weights,
           "--image-size", "1,8,8", "--method", "fast_meta", "--num-images", "6", "--batch-size", "2",
           "--shard-size", "2", "--device", "cpu", "--out", out, "--iterations", "2", "--nz", "16", "--ngf", "8",
           "--backend", "torch", "--preview", "4", "--distributed"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ts = TransferSet(out, verify=True)
    assert len(ts) == 6 and ts.manifest["world_size"] == 2
    assert {s["file"].split("-")[1] for s in ts.manifest["shards"]} == {"000", "001"}
    assert len(set(_image_hashes(ts))) == 6
    assert proc.stdout.count("images/s") >= 3 and proc.stdout.count("total:") == 1  # printed by rank 0 only
    assert "rank 1:" in proc.stdout
