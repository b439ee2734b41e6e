"""Real-data quality benchmark on MNIST-5k (4,000 train / 1,000 held-out), CPU-sized.

The Data Impressions MNIST table in miniature: teacher LeNet-5 (LeNet-5-BN for the BatchNorm-prior methods),
student LeNet-5-half, every student trained with the same KD recipe (``dfkd_fast.tasks.distill``) on:
real data (CE and KD), and transfer sets of EQUAL size from DataImpressions, ClassImpressions, DeepInversion,
CMI and FastMeta (generator methods are run offline here: ``synthesize()`` batches with the adversarial term
off, since there is no student in the loop). Also: robustness of natural vs PGD-trained teachers and of their
students distilled via Data Impressions, a data-free UAP, source-free UDA in both directions, and
class-incremental learning. Writes ``benchmarks/results/quality_cpu.{md,json}``.

Run: ``python benchmarks/quality.py`` (full, ~25 min on 2 cores) or ``--quick`` (smoke test, ~2 min).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

import torch

from dfkd_fast.datasets import digits, mnist5k
from dfkd_fast.models import build_model
from dfkd_fast.tasks._common import synthesize_impressions
from dfkd_fast.tasks.class_incremental import class_incremental
from dfkd_fast.tasks.distill import distill
from dfkd_fast.tasks.robustness import adversarial_train, robustness
from dfkd_fast.tasks.source_free_uda import source_free_uda
from dfkd_fast.tasks.uap import uap
from dfkd_fast.teachers import cached_mnist_teacher, train_classifier

FULL = {"num_images": 1200, "iterations": 200, "di_iterations": 200, "cmi_iterations": 60, "kd_epochs": 40,
        "real_epochs": 20, "adv_epochs": 3, "adv_eps": 0.2, "attack_eps": 0.2, "uap_epochs": 10,
        "uda_impressions": 600, "uda_steps": 400, "ci_epochs": 8, "ci_impressions": 600, "eval_attack_n": 500}
QUICK = {"num_images": 64, "iterations": 10, "di_iterations": 10, "cmi_iterations": 3, "kd_epochs": 2,
         "real_epochs": 1, "adv_epochs": 1, "adv_eps": 0.2, "attack_eps": 0.2, "uap_epochs": 1,
         "uda_impressions": 40, "uda_steps": 5, "ci_epochs": 1, "ci_impressions": 40, "eval_attack_n": 100}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _kd(student: torch.nn.Module, teacher: torch.nn.Module, images: torch.Tensor, test: tuple, p: dict,
        seed: int) -> float:
    res = distill(student, teacher, images, epochs=p["kd_epochs"], lr=0.02, T=4.0, batch_size=64, test_data=test,
                  augment="crop", progress=False, curves=False, seed=seed)
    return res.final_acc


def _synthesize(method: str, teacher: torch.nn.Module, n: int, p: dict, seed: int) -> tuple[torch.Tensor, float]:
    from dfkd_fast.synthesis import build_synthesizer

    if method in ("data_impressions", "class_impressions"):
        imgs, _, secs = synthesize_impressions(teacher, n, (1, 32, 32), method=method, batch_size=100,
                                               iterations=p["di_iterations"], lr=0.05, init_scale=0.1, seed=seed)
        return imgs, secs
    hp: dict[str, Any] = {
        "deep_inversion": {"iterations": p["iterations"], "adv": 0.0, "first_bn_multiplier": 1.0},
        "cmi": {"iterations": p["cmi_iterations"], "adv": 0.0, "ngf": 32, "n_neg": 1024, "bank_size": 8192},
        "fast_meta": {"adv": 0.0, "ngf": 32, "warmup": 0},
    }[method]
    bs = min(100, n)
    synth = build_synthesizer(method, teacher, 10, (1, 32, 32), batch_size=bs, seed=seed, **hp)
    out, secs = [], 0.0
    while sum(len(o) for o in out) < n:
        r = synth.synthesize()
        secs += r.seconds
        out.append(r.images.cpu())
    for q in teacher.parameters():
        q.requires_grad_(True)
    return torch.cat(out)[:n], secs


def section_kd_table(p: dict, seed: int, res: dict) -> None:
    x, y = mnist5k("train")
    test = mnist5k("test")
    t_lenet, acc_t = cached_mnist_teacher("lenet5")
    t_bn, acc_bn = cached_mnist_teacher("lenet5_bn")
    res["teachers"] = {"lenet5": acc_t, "lenet5_bn": acc_bn}
    rows = []
    torch.manual_seed(seed)
    s = build_model("lenet5_half", 10, 1, 32)
    t0 = time.perf_counter()
    h = train_classifier(s, x, y, epochs=p["real_epochs"], lr=2e-3, seed=seed, x_test=test[0], y_test=test[1])
    rows.append({"row": "student CE on real (4,000)", "teacher": "-", "acc": h["final_test_acc"],
                 "images": len(x), "synth_s": 0.0, "img_per_s": None, "train_s": time.perf_counter() - t0})
    _log(f"student-CE real {rows[-1]['acc']:.4f}")
    for tname, teacher in (("lenet5", t_lenet), ("lenet5_bn", t_bn)):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        acc = _kd(build_model("lenet5_half", 10, 1, 32), teacher, x, test, {**p, "kd_epochs": p["real_epochs"]}, seed)
        rows.append({"row": f"student KD on real (4,000), teacher {tname}", "teacher": tname, "acc": acc,
                     "images": len(x), "synth_s": 0.0, "img_per_s": None, "train_s": time.perf_counter() - t0})
        _log(f"student-KD real ({tname}) {acc:.4f}")
    n = p["num_images"]
    for method, tname, teacher in (("data_impressions", "lenet5", t_lenet), ("class_impressions", "lenet5", t_lenet),
                                   ("deep_inversion", "lenet5_bn", t_bn), ("cmi", "lenet5_bn", t_bn),
                                   ("fast_meta", "lenet5_bn", t_bn)):
        try:
            imgs, secs = _synthesize(method, teacher, n, p, seed)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            acc = _kd(build_model("lenet5_half", 10, 1, 32), teacher, imgs, test, p, seed)
            rows.append({"row": f"student KD on {n} {method}", "teacher": tname, "acc": acc, "images": n,
                         "synth_s": secs, "img_per_s": n / secs if secs > 0 else None,
                         "train_s": time.perf_counter() - t0})
            _log(f"{method}: acc {acc:.4f}, synthesis {secs:.1f} s")
        except Exception as e:  # a failing method is recorded in the table, the benchmark goes on
            rows.append({"row": f"student KD on {n} {method}", "teacher": tname, "error": f"{type(e).__name__}: {e}"})
            _log(f"{method} FAILED: {e}")
    res["kd_rows"] = rows
    kd_real = {r["teacher"]: r["acc"] for r in rows if r["row"].startswith("student KD on real")}
    best = max((r for r in rows if "error" not in r and r["synth_s"] > 0), key=lambda r: r["acc"], default=None)
    if best is not None:
        res["goal"] = {"best_data_free": best["row"], "acc": best["acc"], "kd_real": kd_real[best["teacher"]],
                       "ratio": best["acc"] / kd_real[best["teacher"]], "target_ratio": 0.995}


def section_robustness(p: dict, seed: int, res: dict) -> None:
    x, y = mnist5k("train")
    xt, yt = mnist5k("test")
    idx = torch.randperm(len(xt), generator=torch.Generator().manual_seed(seed))[:p["eval_attack_n"]]
    xe, ye = xt[idx], yt[idx]
    natural, _ = cached_mnist_teacher("lenet5")
    robust = copy.deepcopy(natural)
    t0 = time.perf_counter()
    adversarial_train(robust, x, y, eps=p["adv_eps"], steps=5, epochs=p["adv_epochs"], lr=1e-3, clean_weight=0.3,
                      seed=seed)
    res["adv_train_s"] = time.perf_counter() - t0
    rows = []
    for tname, teacher in (("natural", natural), ("pgd-trained", robust)):
        imgs, _, _ = synthesize_impressions(teacher, p["num_images"], (1, 32, 32), iterations=p["di_iterations"],
                                            seed=seed)
        torch.manual_seed(seed)
        student = build_model("lenet5_half", 10, 1, 32)
        _kd(student, teacher, imgs, (xt, yt), p, seed)
        for who, m in (("teacher", teacher), ("student (DI)", student)):
            row = {"teacher": tname, "model": who}
            for a in ("fgsm", "pgd"):
                r = robustness(m, xe, ye, a, p["attack_eps"], steps=10, seed=seed)
                row["natural"] = r.natural_acc
                row[a] = r.adversarial_acc
            rows.append(row)
            _log(f"robustness {tname} {who}: {row}")
        if tname == "natural":
            u = uap(teacher, imgs, xe, epochs=p["uap_epochs"], seed=seed,
                    out_png=os.path.join(res["_out"], "quality_uap.png"))
            res["uap"] = {"fooling_rate": u.fooling_rate, "random_fooling_rate": u.random_fooling_rate,
                          "eps": u.eps, "l2": u.l2_norm, "transfer_images": len(imgs), "png": u.path}
            _log(f"UAP {res['uap']}")
    res["robustness"] = rows


def section_uda(p: dict, seed: int, res: dict) -> None:
    rows = []
    m_mnist, _ = cached_mnist_teacher("lenet5")
    xd, yd = digits("train")
    torch.manual_seed(seed)
    m_digits = build_model("lenet5", 10, 1, 32)
    train_classifier(m_digits, xd, yd, epochs=max(1, p["ci_epochs"] * 2), lr=2e-3, seed=seed)
    for name, model, tgt_train, tgt_test in (("MNIST-5k -> digits", m_mnist, digits("train")[0], digits("test")),
                                             ("digits -> MNIST-5k", m_digits.eval(), mnist5k("train")[0],
                                              mnist5k("test"))):
        imgs, _, secs = synthesize_impressions(model, p["uda_impressions"], (1, 32, 32), iterations=p["di_iterations"],
                                               seed=seed)
        r = source_free_uda(model, imgs, tgt_train, tgt_test, steps=p["uda_steps"], seed=seed)
        rows.append({"direction": name, "source_only": r.source_only_acc, "adapted": r.adapted_acc,
                     "impressions": len(imgs), "seconds": r.seconds + secs})
        _log(f"UDA {rows[-1]}")
    res["uda"] = rows


def section_ci(p: dict, seed: int, res: dict) -> None:
    x, y = mnist5k("train")
    xt, yt = mnist5k("test")
    r = class_incremental(x, y, xt, yt, epochs_old=p["ci_epochs"], epochs_new=p["ci_epochs"],
                          epochs_combined=p["ci_epochs"], num_impressions=p["ci_impressions"],
                          impression_iterations=p["di_iterations"], seed=seed)
    res["class_incremental"] = {"table": r.table(), "num_impressions": r.num_impressions,
                                "rows": {k: vars(v) for k, v in r.rows.items()}, "step1": vars(r.step1)}
    _log("class-incremental\n" + r.table())


def _pct(v: Any) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def to_markdown(res: dict) -> str:
    p = res["params"]
    out = [f"# Quality benchmark (MNIST-5k, CPU) {'[--quick]' if res['quick'] else ''}", "",
           f"command: `{res['command']}`  ", f"date: {res['date']}  ", f"versions: {res['versions']}  ",
           f"sizes: MNIST-5k 4,000 train / 1,000 test; transfer sets of {p['num_images']} images each; "
           f"KD {p['kd_epochs']} epochs (SGD lr 0.02, T 4, batch 64, pad-crop)  ",
           f"total: {res.get('total_s', 0):.0f} s", ""]
    if "teachers" in res:
        t = res["teachers"]
        out += [f"teachers: LeNet-5 {_pct(t['lenet5'])}%, LeNet-5-BN {_pct(t['lenet5_bn'])}%",
                "", "| student LeNet-5-half | teacher | test acc % | images | synthesis s | images/s |",
                "|---|---|---:|---:|---:|---:|"]
        for r in res.get("kd_rows", []):
            if "error" in r:
                out.append(f"| {r['row']} | {r['teacher']} | error: {r['error'][:80]} | | | |")
            else:
                ips = "-" if r["img_per_s"] is None else f"{r['img_per_s']:.1f}"
                out.append(f"| {r['row']} | {r['teacher']} | {_pct(r['acc'])} | {r['images']} | {r['synth_s']:.1f} | "
                           f"{ips} |")
        if "goal" in res:
            g = res["goal"]
            out += ["", f"goal: best data-free student ({g['best_data_free']}) / student-KD-on-real = "
                        f"{g['ratio']:.4f} (target >= 0.995): {'MET' if g['ratio'] >= 0.995 else 'NOT MET'}"]
    if "robustness" in res:
        out += ["", f"## Robustness (eps {p['attack_eps']}, {p['eval_attack_n']} test images; PGD-trained teacher: "
                    f"eps {p['adv_eps']}, {p['adv_epochs']} epochs)", "",
                "| teacher | model | natural % | FGSM % | PGD-10 % |", "|---|---|---:|---:|---:|"]
        out += [f"| {r['teacher']} | {r['model']} | {_pct(r['natural'])} | {_pct(r['fgsm'])} | {_pct(r['pgd'])} |"
                for r in res["robustness"]]
    if "uap" in res:
        u = res["uap"]
        out += ["", f"## UAP (data-free, {u['transfer_images']} Data Impressions, eps {u['eps']:.4f})", "",
                f"fooling rate on real test images: {_pct(u['fooling_rate'])}% vs random noise of the same L2 norm: "
                f"{_pct(u['random_fooling_rate'])}% (image: {u['png']})"]
    if "uda" in res:
        out += ["", "## Source-free UDA (ADDA + Data Impressions, 32x32)", "",
                "| direction | source only % | adapted % | impressions | seconds |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['direction']} | {_pct(r['source_only'])} | {_pct(r['adapted'])} | {r['impressions']} | "
                f"{r['seconds']:.0f} |" for r in res["uda"]]
    if "class_incremental" in res:
        out += ["", f"## Class-incremental (0-4 then 5-9, {res['class_incremental']['num_impressions']} impressions)",
                "", res["class_incremental"]["table"]]
    for k, v in res.get("errors", {}).items():
        out += ["", f"section {k} failed: {v.splitlines()[-1] if v else ''}"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--num-images", type=int, default=None, help="transfer-set size per method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", default="kd,robustness,uda,ci")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.num_images:
        p["num_images"] = args.num_images
    os.makedirs(args.out, exist_ok=True)
    res: dict[str, Any] = {"quick": args.quick, "params": p, "command": " ".join([sys.executable, *sys.argv]),
                           "date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                                       f"threads {torch.get_num_threads()}, "
                                       f"{platform.processor() or platform.machine()}",
                           "_out": args.out, "errors": {}}
    t0 = time.perf_counter()
    sections = {"kd": section_kd_table, "robustness": section_robustness, "uda": section_uda, "ci": section_ci}
    for name in args.sections.split(","):
        _log(f"section {name}")
        try:
            sections[name](p, args.seed, res)
        except Exception:  # record the failure in the results and continue with the next section
            res["errors"][name] = traceback.format_exc()
            _log(f"section {name} failed:\n{res['errors'][name]}")
        res["total_s"] = time.perf_counter() - t0
    stem = "quality_cpu_quick" if args.quick else "quality_cpu"
    md = to_markdown(res)
    res.pop("_out")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
