"""dfkd_fast.health: the data-free health report passes real images and flags one-class / texture / collapsed sets.

Real tiny setup: a BatchNorm conv teacher (tests/cli_models.py ``tiny_bn_cnn``) trained for a few seconds on
scikit-learn digits (8x8); the good set is the held-out real digits, the bad sets are all-one-digit images and
"textures" (noise optimized only for the teacher's class logits, no image or BN prior).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from cli_models import tiny_bn_cnn, train_on_digits

from dfkd_fast.cli import main
from dfkd_fast.health import format_health, health_report, save_health_figure
from dfkd_fast.transfer_set import write_tensors

K, S = 10, 8
SPEC = "cli_models:tiny_bn_cnn"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def teacher(data):
    x, y, xt, yt = data
    torch.manual_seed(0)
    net = train_on_digits(tiny_bn_cnn(K, 1, S), image_size=S)
    net.eval()
    with torch.no_grad():
        assert (net(xt).argmax(1) == yt).double().mean() > 0.85
    return net


@pytest.fixture(scope="module")
def weights(teacher, tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("w") / "bn_teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def textures(teacher):
    """Noise optimized only for the teacher's class logits (balanced targets): confident, no image prior."""
    g = torch.Generator().manual_seed(1)
    z = torch.rand(300, 1, S, S, generator=g).requires_grad_(True)
    tgt = torch.arange(300) % K
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(30):
        loss = F.cross_entropy(teacher(z.clamp(0, 1)), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return z.detach().clamp(0, 1), tgt


def test_good_set_passes_bad_sets_are_flagged(teacher, data, textures):
    x, y, xt, yt = data
    good = health_report(xt, teacher, targets=yt)
    one = health_report(x[y == 3], teacher)
    tex = health_report(textures[0], teacher, targets=textures[1])
    assert good["warnings"] == [], format_health(good)
    assert good["bn_teacher"] and len(good["set"]["bn_kl"]) == len(good["noise"]["bn_kl"]) == 1
    assert good["set"]["bn_kl_mean"] < good["noise"]["bn_kl_mean"]  # real images match the running statistics
    assert good["agreement"] > 0.85 and good["set"]["class_entropy"] > 0.95
    assert any(w.startswith("one-class") for w in one["warnings"]), one["warnings"]
    assert not any(w.startswith("texture-like") for w in one["warnings"])
    assert any(w.startswith("texture-like") for w in tex["warnings"]), format_health(tex)
    assert tex["set"]["mean_confidence"] > 0.9 and tex["agreement"] > 0.9  # confident: only the BN cue catches it
    assert good["score"] > max(one["score"], tex["score"]) + 0.2, (good["score"], one["score"], tex["score"])
    for r in (good, one, tex):
        assert 0.0 <= r["score"] <= 1.0
        assert sum(r["set"]["class_counts"]) == r["evaluated"] == sum(r["set"]["confidence_hist"])
        json.dumps(r)


def test_collapsed_and_subsample(teacher, data):
    _, _, xt, _ = data
    dup = health_report(xt[:5].repeat(60, 1, 1, 1), teacher)
    assert any(w.startswith("collapsed") for w in dup["warnings"]), dup["warnings"]
    assert dup["set"]["exact_duplicates"] > 0.95 and dup["components"]["diversity"] < 0.05
    sub = health_report(xt, teacher, max_images=50, noise_reference=False)
    assert sub["images"] == len(xt) and sub["evaluated"] == 50 and sub["noise"] is None
    assert "prior" not in sub["components"]
    with pytest.raises(ValueError, match="--num-classes"):
        health_report(xt, teacher, logits=torch.zeros(len(xt), K + 1))


def test_format_and_figure(teacher, data, tmp_path):
    _, _, xt, _ = data
    r = health_report(xt[:100], teacher)
    text = format_health(r)
    assert text.startswith(f"health: score {r['score']:.2f}") and "(noise " in text and "BN statistics" in text
    path = save_health_figure(r, tmp_path / "h.png")
    assert open(path, "rb").read(8) == PNG_MAGIC
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def _flags(weights):
    return ["--teacher", SPEC, "--weights", weights, "--num-classes", str(K), "--image-size", f"1,{S},{S}",
            "--device", "cpu"]


def test_inspect_cli(teacher, weights, data, tmp_path, capsys):
    _, _, xt, _ = data
    with torch.no_grad():
        logits = teacher(xt)
    ts = write_tensors(str(tmp_path / "ts"), xt, logits, {"method": "real"})
    assert main(["inspect", ts, *_flags(weights)]) == 0
    printed = capsys.readouterr().out
    rep = json.loads((tmp_path / "ts" / "health.json").read_text())
    assert printed.startswith(f"health: score {rep['score']:.2f} (no warnings)")
    assert rep["images"] == len(xt) and rep["agreement"] == 1.0  # write_tensors stores the logits' argmax
    assert (tmp_path / "ts" / "health.png").read_bytes()[:8] == PNG_MAGIC
    other = tmp_path / "elsewhere"
    assert main(["inspect", "--transfer-set", ts, "--out", str(other), "--max-images", "64", *_flags(weights)]) == 0
    assert json.loads((other / "health.json").read_text())["evaluated"] == 64 and (other / "health.png").exists()
    assert main(["inspect", ts, *_flags(weights)[:-6], "--num-classes", "5", "--image-size", f"1,{S},{S}"]) != 0
    assert "--num-classes" in capsys.readouterr().err


def _synthesize(weights, out):
    return main(["synthesize", *_flags(weights), "--method", "data_impressions", "--num-images", "16",
                 "--batch-size", "8", "--out", str(out), "--iterations", "3", "--preview", "0"])


def test_synthesize_writes_health(weights, tmp_path, capsys):
    out = tmp_path / "set"
    assert _synthesize(weights, out) == 0
    printed = capsys.readouterr().out
    rep = json.loads((out / "health.json").read_text())
    assert rep["images"] == 16 and 0.0 <= rep["score"] <= 1.0 and rep["bn_teacher"]
    line = f"health: score {rep['score']:.2f} (" + ("; ".join(rep["warnings"]) or "no warnings") + ")"
    assert line in printed.splitlines()


def test_health_failure_never_fails_synthesis(weights, tmp_path, capsys, monkeypatch):
    import dfkd_fast.health

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(dfkd_fast.health, "transfer_set_health", broken)
    out = tmp_path / "set"
    assert _synthesize(weights, out) == 0
    err = capsys.readouterr().err
    assert "health report" in err and "RuntimeError: boom second line" in err
    assert (out / "manifest.json").exists() and not (out / "health.json").exists()


def test_feature_spread_is_the_participation_ratio_over_k_minus_1(teacher, data):
    """``spread`` = min(1, PR / (K - 1)), PR = (sum l)^2 / sum l^2 of the penultimate-feature covariance spectrum:
    r equal-variance orthogonal directions give PR = r; real digits spread over more directions than a set of
    blends of two digits (a one-dimensional family), and the spread enters the score (geometric mean)."""
    from dfkd_fast.health import _participation_ratio

    g = torch.Generator().manual_seed(0)
    for r in (1, 3, 7):
        basis = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))[0][:, :r]
        f = torch.randn(4000, r, generator=g, dtype=torch.float64) @ basis.T
        assert _participation_ratio(f) == pytest.approx(r, rel=0.08)
    assert _participation_ratio(torch.ones(5, 4)) is None and _participation_ratio(torch.randn(1, 4)) is None
    _, _, xt, _ = data
    a = torch.linspace(0, 1, 300).view(-1, 1, 1, 1)
    blends = a * xt[0] + (1 - a) * xt[1]
    good, line = health_report(xt, teacher), health_report(blends, teacher)
    for rep in (good, line):
        s = rep["set"]
        assert s["feature_spread"] == pytest.approx(min(1.0, s["feature_participation"] / (K - 1)))
        assert rep["components"]["spread"] == s["feature_spread"]
        comps = list(rep["components"].values())
        assert rep["score"] == pytest.approx(torch.tensor(comps).clamp_min(1e-3).log().mean().exp().item(), rel=1e-6)
    assert good["set"]["feature_participation"] > line["set"]["feature_participation"] + 1.0
    assert good["components"]["spread"] > line["components"]["spread"]
    assert "feature participation ratio" in format_health(good)
