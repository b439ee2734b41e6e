"""``dfkd-fast distill --online --method M`` and the per-paper online schedules (SPEC §7).

Real tiny setup: a BatchNorm conv teacher trained on scikit-learn digits (8x8), a smaller BN-free student,
generators with nz = 8..16 and ngf = 4..8; every run takes a few steps on one thread.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from cli_models import tiny_bn_cnn, tiny_student, train_on_digits

import dfkd_fast.synthesis as synthesis
from dfkd_fast.cli import main
from dfkd_fast.synthesis import build_synthesizer
from dfkd_fast.synthesis.base import Synthesizer
from dfkd_fast.tasks.distill import distill_online
from dfkd_fast.transfer_set import TransferSet, write_tensors

K, S = 10, 8
TESTS = os.path.dirname(os.path.abspath(__file__))
TEACHER = "cli_models:tiny_bn_cnn"
#: tiny hyper-parameters per method (CLI flags)
SMALL = {
    "dafl": ["--nz", "8", "--ngf", "4"],
    "zskt": ["--nz", "8", "--ngf", "4", "--n-s", "2"],
    "dfq": ["--nz", "8", "--ngf", "4"],
    "cmi": ["--nz", "8", "--ngf", "4", "--iterations", "2", "--n-neg", "8", "--bank-size", "64", "--head-dim", "8"],
    "fast_meta": ["--nz", "8", "--ngf", "4", "--iterations", "2"],
}
GEN = {"nz": 8, "ngf": 4}


@pytest.fixture(autouse=True)
def _env(cli_env):
    yield


@pytest.fixture(scope="module")
def teacher(data):
    x, y, _, _ = data
    torch.manual_seed(0)
    net = train_on_digits(tiny_bn_cnn(K, 1, S), image_size=S)
    return net.eval()


@pytest.fixture(scope="module")
def weights(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """A 4-image transfer set used as impression_space's --reference-images."""
    x = data[0][:4]
    out = str(tmp_path_factory.mktemp("ref") / "ref")
    write_tensors(out, x, torch.zeros(4, K), {"method": "real"})
    return out


def _argv(method: str, weights: str, out, *extra: str, epochs: int = 1) -> list[str]:
    return ["distill", "--online", "--method", method, "--teacher", TEACHER, "--weights", weights, "--student",
            "cli_models:tiny_student", "--image-size", f"1,{S},{S}", "--epochs", str(epochs), "--ep-steps", "2",
            "--kd-steps", "2", "--batch-size", "8", "--synthesis-batch-size", "6", "--device", "cpu", "--out",
            str(out), *SMALL.get(method, ["--iterations", "2"]), *extra]


def _student(seed: int = 1):
    torch.manual_seed(seed)
    return tiny_student(K, 1, S)


def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def _same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# ----------------------------------------------------------------------------- the CLI, every method
@pytest.mark.parametrize("method", synthesis.list_methods())
def test_cli_runs_every_method_for_one_epoch(method, weights, reference, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--reference-images", reference] if method == "impression_space" else []
    assert main(_argv(method, weights, out, "--test-set", "digits", *extra)) == 0
    printed = capsys.readouterr().out
    assert f"online {method}" in printed and "test accuracy" in printed
    for name in ("student.safetensors", "metrics.jsonl", "curves.png", "checkpoint.pt"):
        assert os.path.getsize(out / name) > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and rows[0]["kd_steps"] == 2
    assert rows[0]["kd_loss"] > 0 and 0 <= rows[0]["test_acc"] <= 1 and rows[0]["images"] >= 6
    assert 0 < rows[0]["synth_seconds"] <= rows[0]["seconds"]
    ts = TransferSet(str(out / "transfer_set"))
    assert len(ts) == rows[0]["pool"] == 6  # one round, one synthesized batch kept
    health = json.loads((out / "transfer_set" / "health.json").read_text())  # every set gets its health report
    assert 0 <= health["score"] <= 1 and isinstance(health["warnings"], list)


def test_cli_errors_name_the_flag(weights, tmp_path, capsys):
    base = _argv("dafl", weights, tmp_path / "e")
    cases = {
        "--method": [a for i, a in enumerate(base) if a != "--method" and base[i - 1] != "--method"],
        "--transfer-set": [*base, "--transfer-set", str(tmp_path)],
        "--kd-steps": [*base, "--kd-steps", "0"],
        "--warmup": [*base, "--warmup", "3"],
        "--opt warmup": _argv("fast_meta", weights, tmp_path / "f", "--opt", "warmup=2"),
    }
    for flag, argv in cases.items():
        assert main(argv) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith("dfkd-fast: error:") and flag in err and len(err.strip().splitlines()) == 1, err
    # offline distill still needs its transfer set
    assert main(["distill", "--teacher", TEACHER, "--student", "cli_models:tiny_student"]) == 2
    assert "--transfer-set" in capsys.readouterr().err


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("method,n_s", [("dafl", 1), ("dfq", 1), ("zskt", 2)])
def test_fresh_methods_draw_fresh_samples_every_student_step(method, n_s, teacher):
    student = _student()
    extra = {"n_s": n_s} if method == "zskt" else {}
    synth = build_synthesizer(method, teacher, K, (1, S, S), batch_size=6, student=student, **GEN, **extra)
    sizes: list[int] = []
    synth.netG.register_forward_hook(lambda m, a, o: sizes.append(int(o.shape[0])))
    pool_draws = []
    from dfkd_fast.tasks.distill.online import ImagePool

    orig = ImagePool.sample
    ImagePool.sample = lambda self, *a, **k: pool_draws.append(1) or orig(self, *a, **k)
    try:
        res = distill_online(student, teacher, synth, rounds=2, kd_steps_per_round=4, batch_size=5, augment=False,
                             progress=False)
    finally:
        ImagePool.sample = orig
    g_steps = 2 * 4 // n_s  # one generator step (iterations = 1) per n_s student steps
    assert sizes.count(6) == g_steps and synth.batches_done == g_steps
    assert sizes.count(5) == 2 * 4  # one fresh generator batch per student step
    assert not pool_draws  # no replay: the student never samples the pool
    assert res.images == 2 * 6 and len(res.train_loss) == 2


def test_pool_methods_replay_the_pool(teacher):
    student = _student()
    synth = build_synthesizer("fast_meta", teacher, K, (1, S, S), batch_size=6, student=student, iterations=2, **GEN)
    sizes: list[int] = []
    synth.fast.register_forward_hook(lambda m, a, o: sizes.append(int(o.shape[0])))
    res = distill_online(student, teacher, synth, rounds=3, kd_steps_per_round=4, batch_size=5, progress=False)
    assert sizes == [6] * (3 * 2)  # only synthesis forwards; KD batches come from the pool
    assert res.images == 18 and synth.batches_done == 3


def _zskt_run(teacher, **kw):
    student = _student()
    synth = build_synthesizer("zskt", teacher, K, (1, S, S), batch_size=6, student=student, n_s=3, **GEN, **kw)
    res = distill_online(student, teacher, synth, rounds=1, kd_steps_per_round=3, batch_size=6, augment=False,
                         weight_decay=0.0, progress=False)
    return synth, student, res


def test_zskt_student_steps_use_attention_transfer_and_clip(teacher):
    synth, with_at, res_at = _zskt_run(teacher)
    assert synth.config.beta == 250.0 and synth.config.T == 1.0 and synth.config.clip == 5.0
    assert synth.at_pairs == (("2", "1"),)  # auto: the 8x8 stage, the one resolution both nets share (>1x1)
    _, no_beta, res_plain = _zskt_run(teacher, beta=0.0)
    _, no_layers, res_none = _zskt_run(teacher, at_layers=())
    assert not _same(_params(with_at), _params(no_beta))  # beta reaches the student's loss
    assert _same(_params(no_beta), _params(no_layers))  # beta 0 == no layer pairs: KD only
    assert res_at.train_loss[0] > res_plain.train_loss[0]  # the AT term adds to the student loss
    # clipping: with a tiny clip norm the student barely moves
    init = _params(_student())
    _, clipped, _ = _zskt_run(teacher, clip=1e-9)
    moved = max(float((p - q).abs().max()) for p, q in zip(_params(clipped), init, strict=True))
    assert moved < 1e-6
    assert max(float((p - q).abs().max()) for p, q in zip(_params(with_at), init, strict=True)) > 1e-4


def test_fast_meta_warmup_no_kd_no_adversarial(teacher):
    student = _student()
    synth = build_synthesizer("fast_meta", teacher, K, (1, S, S), batch_size=6, student=student, iterations=2,
                              **GEN)
    calls = []
    orig = synth.adversarial_loss
    synth.adversarial_loss = lambda *a, **k: calls.append(synth.batches_done) or orig(*a, **k)
    init = _params(student)
    res = distill_online(student, teacher, synth, rounds=2, kd_steps_per_round=3, warmup_rounds=2, batch_size=5,
                         progress=False)
    assert synth.config.warmup == 2  # one warm-up setting
    assert not calls and res.train_loss == [] and _same(_params(student), init)
    res = distill_online(student, teacher, synth, rounds=1, kd_steps_per_round=3, warmup_rounds=0, batch_size=5,
                         progress=False)
    assert calls == [2, 2] and len(res.train_loss) == 1 and not _same(_params(student), init)


def test_deep_inversion_adi_is_off_during_warmup(teacher):
    student = _student()
    synth = build_synthesizer("deep_inversion", teacher, K, (1, S, S), batch_size=4, student=student, iterations=2)
    held = []
    orig = synth.synthesize
    synth.synthesize = lambda *a, **k: held.append(synth.student) or orig(*a, **k)
    res = distill_online(student, teacher, synth, rounds=3, kd_steps_per_round=2, warmup_rounds=2, batch_size=4,
                         progress=False)
    assert held == [None, None, student] and synth.student is student  # the competition term needs the student
    assert len(res.train_loss) == 1 and res.images == 12


def test_fast_meta_reset_l0_reinitializes_the_first_layer(teacher):
    synth = build_synthesizer("fast_meta", teacher, K, (1, S, S), batch_size=4, iterations=1, warmup=1,
                              reset_after=1, **GEN)
    assert synth.config.reset_l0 and not synth.config.reset_bn  # the published scripts' settings
    first, bn = synth.netG.l1[0], synth.netG.conv_blocks[0]
    seen = []
    orig = synth.reset_layers
    synth.reset_layers = lambda: seen.append(synth.batches_done) or orig()
    for _ in range(4):
        synth.synthesize()
    assert seen == [2]  # once, before batch warmup + reset_after
    with torch.no_grad():
        first.weight.fill_(5.0)
        first.bias.fill_(3.0)
        bn.weight.fill_(7.0)
    synth.reset_layers()
    w = first.weight.detach()
    assert float(first.bias.detach().abs().max()) == 0.0
    assert abs(float(w.mean())) < 0.01 and 0.015 < float(w.std()) < 0.025
    assert float(bn.weight.detach().min()) == 7.0  # reset_bn off
    on = build_synthesizer("fast_meta", teacher, K, (1, S, S), batch_size=4, reset_bn=True, **GEN)
    with torch.no_grad():
        on.netG.conv_blocks[0].weight.fill_(7.0)
    on.reset_layers()
    assert abs(float(on.netG.conv_blocks[0].weight.detach().mean()) - 1.0) < 0.02


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method", ["dafl", "fast_meta"])
def test_resume_is_exact(method, weights, tmp_path, monkeypatch, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_argv(method, weights, full, "--warmup", "1", epochs=4)) == 0
    per_epoch = 2 if method == "dafl" else 1  # synthesize calls per epoch (ep-steps 2 / kd-steps 2 = 1 round)
    orig = Synthesizer.synthesize
    calls = [0]

    def dying(self, *a, **k):
        calls[0] += 1
        if calls[0] > 2 * per_epoch:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(Synthesizer, "synthesize", dying)
    assert main(_argv(method, weights, cut, "--warmup", "1", epochs=4)) == 130  # interrupted in epoch 3
    monkeypatch.setattr(Synthesizer, "synthesize", orig)
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(_argv(method, weights, cut, "--warmup", "1", "--resume", epochs=4)) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(full / "student.safetensors")), load_file(str(cut / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["kd_loss"] for r in ra] == [r["kd_loss"] for r in rb] and len(rb) == 4
    assert [r["gen_loss"] for r in ra] == [r["gen_loss"] for r in rb]
    ga = torch.load(full / "checkpoint.pt", weights_only=True)["synthesizer"]["generator"]
    gb = torch.load(cut / "checkpoint.pt", weights_only=True)["synthesizer"]["generator"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)  # the (meta) generator too
    ta, tb = TransferSet(str(full / "transfer_set")), TransferSet(str(cut / "transfer_set"))
    assert len(ta) == len(tb) == 4 * 6
    assert torch.equal(ta.images(), tb.images())


# ----------------------------------------------------------------------------- it learns
def _agreement(student, teacher, x) -> float:
    with torch.no_grad():
        return float((student.eval()(x).argmax(1) == teacher(x).argmax(1)).float().mean())


def test_online_generator_method_improves_agreement(teacher, data):
    xt = data[2]
    student = _student()
    before = _agreement(student, teacher, xt)
    synth = build_synthesizer("dafl", teacher, K, (1, S, S), batch_size=64, student=student, nz=32, ngf=8, seed=0)
    res = distill_online(student, teacher, synth, rounds=4, kd_steps_per_round=25, lr=0.05, T=4.0, batch_size=64,
                         augment=False, progress=False)
    after = _agreement(student, teacher, xt)
    assert res.train_loss[-1] < res.train_loss[0]
    assert after > before + 0.25, (before, after)


@pytest.mark.parametrize("method", ["dafl", "dfq", "zskt", "cmi"])
def test_default_warmup_is_a_fifth_of_the_rounds_for_fresh_schedules(teacher, method):
    """``warmup_rounds=None`` (default): DAFL / DFQ / ZSKT (fresh samples every student step) train only their
    generator for ``rounds // 5`` rounds -- no KD, no adversarial term -- the pool methods start KD at once;
    an explicit 0 keeps the paper's schedule."""
    fresh = method in ("dafl", "dfq", "zskt")
    kw = dict(batch_size=4, student=None, iterations=1, **GEN)
    for warmup, expect in ((None, 2 if fresh else 0), (0, 0)):
        student = _student()
        synth = build_synthesizer(method, teacher, K, (1, S, S), **dict(kw, student=student))
        paused = []
        orig = synth.synthesize
        synth.synthesize = lambda *a, _o=orig, _s=synth, **k: paused.append(_s.adversarial_paused) or _o(*a, **k)
        res = distill_online(student, teacher, synth, rounds=10, kd_steps_per_round=2 if fresh and method != "zskt"
                             else 10, rounds_per_epoch=1, warmup_rounds=warmup, batch_size=4, augment=False,
                             progress=False)
        assert len(res.train_loss) == 10 - expect, (method, warmup, res.train_loss)
        # the adversarial term is paused in the warm-up calls only, which come first
        assert paused == sorted(paused, reverse=True) and any(paused) == (expect > 0), (method, warmup, paused)
