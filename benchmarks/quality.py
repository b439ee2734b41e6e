"""Real-data quality benchmark on MNIST-5k (4,000 train / 1,000 held-out), CPU-sized.

The Data Impressions MNIST table in miniature: teacher LeNet-5 (LeNet-5-BN for the BatchNorm-prior methods),
student LeNet-5-half, every method in the mode its paper uses, over several seeds (mean and spread):
real data (CE and KD); offline synthesize-then-KD for Data Impressions, Class Impressions and DeepInversion
(transfer sets of equal size, same KD recipe); ONLINE distillation (``distill_online``: the generator trains
against the learning student, each method on its paper's schedule) for DAFL, ZSKT, DFQ, CMI and FastMeta,
with the same student step budget. Synthesis seconds, end-to-end seconds and images/s per run, and a Pareto
picture (student accuracy / KD-on-real against synthesis seconds, ``quality_cpu.png``). Also: robustness of
natural vs PGD-trained teachers and of their
students distilled via Data Impressions, a data-free UAP, source-free UDA in both directions, and
class-incremental learning. Writes ``benchmarks/results/quality_cpu.{md,json,png}``; ``--sections kd`` re-runs
only the KD table and keeps the other sections of an existing ``quality_cpu.json``.

Run: ``python benchmarks/quality.py`` (full) or ``--quick`` (smoke test, ~2 min).
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

FULL = {"online_kd_steps": 2000, "online_batch": 64, "seeds": "0,1",
        "num_images": 1200, "iterations": 200, "di_iterations": 200, "cmi_iterations": 60, "kd_epochs": 100,
        "real_epochs": 20, "adv_epochs": 3, "adv_eps": 0.2, "attack_eps": 0.2, "uap_epochs": 10,
        "uda_impressions": 600, "uda_steps": 400, "ci_epochs": 8, "ci_impressions": 600, "eval_attack_n": 500}
QUICK = {"online_kd_steps": 8, "online_batch": 16, "seeds": "0",
         "num_images": 64, "iterations": 10, "di_iterations": 10, "cmi_iterations": 3, "kd_epochs": 2,
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


#: method -> (teacher, mode); generator methods run online as their papers do.
KD_METHODS = {"data_impressions": ("lenet5", "offline"), "class_impressions": ("lenet5", "offline"),
              "deep_inversion": ("lenet5_bn", "offline"), "dafl": ("lenet5", "online"), "zskt": ("lenet5", "online"),
              "dfq": ("lenet5_bn", "online"), "cmi": ("lenet5_bn", "online"), "fast_meta": ("lenet5_bn", "online")}


def _online_plan(method: str, p: dict) -> dict:
    """Synthesis batch, rounds and KD steps per round of an online run: every method gets the same number of
    student steps (``online_kd_steps`` at batch ``online_batch``, about the offline KD budget: 100 epochs x 19)."""
    steps = p["online_kd_steps"]
    if method in ("dafl", "dfq", "zskt"):  # fresh samples: 1 round = 1 generator step (+ n_s student steps)
        n_s = 10 if method == "zskt" else 1
        return {"batch": p["online_batch"], "rounds": max(1, steps // n_s), "kd": n_s, "hp": {"ngf": 32}}
    if method == "cmi":  # pool: 10 synthesized batches, each of `cmi_online_iterations` generator steps
        rounds = 20 if steps >= 1000 else 10 if steps >= 100 else 2
        return {"batch": p["online_batch"], "rounds": rounds, "kd": steps // rounds,
                "hp": {"iterations": p.get("cmi_online_iterations", 20 if steps >= 100 else 2), "ngf": 32,
                       "n_neg": 512, "bank_size": 4096}}
    rounds = 80 if steps >= 1000 else 40 if steps >= 100 else 2  # fast_meta: batches of 5 inner steps each
    return {"batch": p["online_batch"], "rounds": rounds, "kd": steps // rounds, "hp": {"ngf": 32},
            "warmup": rounds // 10}


def _run_online(method: str, teacher: torch.nn.Module, test: tuple, p: dict, seed: int) -> dict:
    from dfkd_fast.synthesis import build_synthesizer
    from dfkd_fast.tasks.distill import distill_online

    plan = _online_plan(method, p)
    torch.manual_seed(seed)
    student = build_model("lenet5_half", 10, 1, 32)
    synth = build_synthesizer(method, teacher, 10, (1, 32, 32), batch_size=plan["batch"], seed=seed, student=student,
                              **plan["hp"])
    t0 = time.perf_counter()
    r = distill_online(student, teacher, synth, plan["rounds"], plan["kd"], rounds_per_epoch=plan["rounds"],
                       lr=0.02, T=4.0, batch_size=plan["batch"], warmup_rounds=plan.get("warmup", 0),
                       augment="crop", test_data=test, progress=False, seed=seed)
    wall = time.perf_counter() - t0
    synthesized = plan["rounds"] * plan["batch"]
    if method in ("dafl", "dfq", "zskt"):  # one generator batch per round + one fresh batch per student step
        synthesized = plan["rounds"] * plan["batch"] * (1 + plan["kd"])
    return {"acc": r.final_acc, "synth_s": r.synth_seconds, "e2e_s": wall, "images": synthesized,
            "pool": r.images, "kd_steps": plan["rounds"] * plan["kd"], "plan": {k: v for k, v in plan.items()
                                                                                 if k != "hp"} | plan["hp"]}


def _run_offline(method: str, teacher: torch.nn.Module, test: tuple, p: dict, seed: int) -> dict:
    t0 = time.perf_counter()
    imgs, secs = _synthesize(method, teacher, p["num_images"], p, seed)
    torch.manual_seed(seed)
    acc = _kd(build_model("lenet5_half", 10, 1, 32), teacher, imgs, test, p, seed)
    return {"acc": acc, "synth_s": secs, "e2e_s": time.perf_counter() - t0, "images": len(imgs),
            "kd_steps": p["kd_epochs"] * -(-len(imgs) // 64)}


def _mean_spread(vals: list[float]) -> tuple[float, float]:
    vals = [v for v in vals if v == v]
    if not vals:
        return float("nan"), float("nan")
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2


def section_kd_table(p: dict, seed: int, res: dict) -> None:
    x, y = mnist5k("train")
    test = mnist5k("test")
    t_lenet, acc_t = cached_mnist_teacher("lenet5")
    t_bn, acc_bn = cached_mnist_teacher("lenet5_bn")
    teachers = {"lenet5": t_lenet, "lenet5_bn": t_bn}
    res["teachers"] = {"lenet5": acc_t, "lenet5_bn": acc_bn}
    seeds = [seed + int(s) for s in str(p["seeds"]).split(",")]
    res["seeds"] = seeds
    runs: list[dict] = []
    for sd in seeds:
        torch.manual_seed(sd)
        s = build_model("lenet5_half", 10, 1, 32)
        t0 = time.perf_counter()
        h = train_classifier(s, x, y, epochs=p["real_epochs"], lr=2e-3, seed=sd, x_test=test[0], y_test=test[1])
        runs.append({"row": "CE on real", "teacher": "-", "mode": "real", "seed": sd, "acc": h["final_test_acc"],
                     "images": len(x), "synth_s": 0.0, "e2e_s": time.perf_counter() - t0})
        for tname, teacher in teachers.items():
            torch.manual_seed(sd)
            t0 = time.perf_counter()
            acc = _kd(build_model("lenet5_half", 10, 1, 32), teacher, x, test, {**p, "kd_epochs": p["real_epochs"]},
                      sd)
            runs.append({"row": "KD on real", "teacher": tname, "mode": "real", "seed": sd, "acc": acc,
                         "images": len(x), "synth_s": 0.0, "e2e_s": time.perf_counter() - t0})
            _log(f"seed {sd}: KD on real ({tname}) {acc:.4f}")
        for method, (tname, mode) in KD_METHODS.items():
            try:
                run = (_run_online if mode == "online" else _run_offline)(method, teachers[tname], test, p, sd)
                runs.append({"row": method, "teacher": tname, "mode": mode, "seed": sd, **run})
                _log(f"seed {sd}: {method} ({mode}) acc {run['acc']:.4f}, synthesis {run['synth_s']:.1f} s, "
                     f"end to end {run['e2e_s']:.1f} s")
            except Exception as e:  # a failing method is recorded in the table, the benchmark goes on
                runs.append({"row": method, "teacher": tname, "mode": mode, "seed": sd,
                             "error": f"{type(e).__name__}: {e}"})
                _log(f"seed {sd}: {method} FAILED: {traceback.format_exc()}")
    res["kd_runs"] = runs
    summarize_kd(res)


def summarize_kd(res: dict) -> None:
    """Rows (mean and half-range over seeds), goals and the Pareto picture from ``res["kd_runs"]``."""
    runs = res["kd_runs"]
    teachers = sorted({r["teacher"] for r in runs if r["teacher"] != "-"})
    kd_real = {t: _mean_spread([r["acc"] for r in runs if r["row"] == "KD on real" and r["teacher"] == t])[0]
               for t in teachers}
    res["seeds"] = sorted({r["seed"] for r in runs})
    rows = []
    for name in ["CE on real", "KD on real", *KD_METHODS]:
        for tname in ["-", *teachers]:
            rs = [r for r in runs if r["row"] == name and r["teacher"] == tname and "error" not in r]
            errs = [r["error"] for r in runs if r["row"] == name and r["teacher"] == tname and "error" in r]
            if not rs and not errs:
                continue
            acc, spread = _mean_spread([r["acc"] for r in rs])
            row = {"row": name, "teacher": tname, "mode": (rs or [{}])[0].get("mode", "?"), "n": len(rs),
                   "acc": acc, "acc_spread": spread, "errors": errs}
            if rs:
                row["synth_s"] = _mean_spread([r["synth_s"] for r in rs])[0]
                row["e2e_s"] = _mean_spread([r["e2e_s"] for r in rs])[0]
                row["images"] = rs[0]["images"]
                row["img_per_s"] = row["images"] / row["synth_s"] if row["synth_s"] > 0 else None
                row["ratio"] = acc / kd_real[tname] if tname in kd_real else None
                row["ratio_per_seed"] = ([r["acc"] / kd_real[tname] for r in rs] if tname in kd_real else None)
            rows.append(row)
    res["kd_rows"] = rows
    # a ratio of two accuracies says nothing when the KD-on-real reference is itself near chance (1/10 + 10 points)
    free = [r for r in rows if r["row"] in KD_METHODS and r.get("ratio") is not None and kd_real[r["teacher"]] > 0.2]
    if free:
        best = max(free, key=lambda r: r["ratio"])
        res["goal"] = {"best_data_free": best["row"], "acc": best["acc"], "kd_real": kd_real[best["teacher"]],
                       "ratio": best["ratio"], "target_ratio": 0.995}
    fm = next((r for r in free if r["row"] == "fast_meta"), None)
    di = next((r for r in free if r["row"] == "deep_inversion"), None)
    if fm is not None and di is not None and fm.get("img_per_s") and di.get("img_per_s"):
        res["goal_fast_meta"] = {"ratio": fm["ratio"], "target_ratio": 0.98,
                                 "speedup_vs_deep_inversion": fm["img_per_s"] / di["img_per_s"], "target_speedup": 10}
    _pareto_plot(rows, os.path.join(res["_out"], ("quality_cpu_quick" if res["quick"] else "quality_cpu") + ".png"))
    res["pareto_png"] = ("quality_cpu_quick" if res["quick"] else "quality_cpu") + ".png"


def _pareto_plot(rows: list[dict], path: str) -> None:
    """Student accuracy / KD-on-real (mean, bars = spread over seeds) against synthesis seconds (log x); the
    Pareto front (no other method both faster and better) is drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["row"] in KD_METHODS and r.get("ratio") is not None and r.get("synth_s")]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in pts:
        kd = r["acc"] / r["ratio"]
        ax.errorbar(r["synth_s"], r["ratio"], yerr=r["acc_spread"] / kd, fmt="o" if r["mode"] == "online" else "s",
                    capsize=3, label=f"{r['row']} ({r['mode']})")
        ax.annotate(r["row"], (r["synth_s"], r["ratio"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front, best = [], -1.0
    for r in sorted(pts, key=lambda r: r["synth_s"]):
        if r["ratio"] > best:
            front.append(r)
            best = r["ratio"]
    ax.step([r["synth_s"] for r in front], [r["ratio"] for r in front], where="post", color="gray", alpha=0.6,
            label="Pareto front")
    ax.axhline(0.995, color="red", linestyle="--", linewidth=1, label="target 0.995")
    ax.set_xscale("log")
    ax.set_xlabel("synthesis seconds per run (log scale, CPU, one thread per run)")
    ax.set_ylabel("student accuracy / KD-on-real")
    ax.set_title("MNIST-5k, LeNet-5(-BN) -> LeNet-5-half: quality vs synthesis cost")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


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
    if res.get("kept_from"):
        out += ["sections not re-run, kept from the earlier run: "
                + ", ".join(f"{k} ({v})" for k, v in res["kept_from"].items()), ""]
    if res.get("merged_from"):
        out += ["merged from: " + "; ".join(f"`{m['command']}` ({m['date']}, {m['total_s']:.0f} s)"
                                             for m in res["merged_from"]), ""]
    if "teachers" in res:
        t = res["teachers"]
        out += [f"teachers: LeNet-5 {_pct(t['lenet5'])}%, LeNet-5-BN {_pct(t['lenet5_bn'])}%; seeds "
                f"{res.get('seeds')}; offline methods: {p['num_images']} images, KD {p['kd_epochs']} epochs; online "
                f"methods: {p['online_kd_steps']} student steps at batch {p['online_batch']} (distill_online, each "
                "method on its paper's schedule)", "",
                "| student LeNet-5-half | teacher | mode | test acc % (mean ± half-range) | / KD-on-real | "
                "images synthesized | synthesis s | end-to-end s | images/s |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in res.get("kd_rows", []):
            if r.get("n", 0) == 0:
                out.append(f"| {r['row']} | {r['teacher']} | {r['mode']} | error: {r['errors'][0][:80]} | | | | | |")
                continue
            ratio = "-" if r.get("ratio") is None or r["row"] == "KD on real" else f"{r['ratio']:.4f}"
            ips = "-" if r.get("img_per_s") is None else f"{r['img_per_s']:.1f}"
            err = f" ({len(r['errors'])} failed)" if r["errors"] else ""
            out.append(f"| {r['row']} | {r['teacher']} | {r['mode']} | {_pct(r['acc'])} ± {_pct(r['acc_spread'])}"
                       f"{err} | {ratio} | {r['images']} | {r['synth_s']:.1f} | {r['e2e_s']:.1f} | {ips} |")
        if "goal" in res:
            g = res["goal"]
            out += ["", f"goal 1: best data-free student ({g['best_data_free']}) / student-KD-on-real = "
                        f"{g['ratio']:.4f} (target >= 0.995): {'MET' if g['ratio'] >= 0.995 else 'NOT MET'}"]
        if "goal_fast_meta" in res:
            g = res["goal_fast_meta"]
            met = g["ratio"] >= 0.98 and g["speedup_vs_deep_inversion"] >= 10
            out += [f"goal 2: FastMeta online / KD-on-real = {g['ratio']:.4f} (target >= 0.98) at "
                    f"{g['speedup_vs_deep_inversion']:.1f}x DeepInversion's synthesis images/s (target >= 10x): "
                    f"{'MET' if met else 'NOT MET'}"]
        if "pareto_png" in res:
            out += ["", f"picture: `{res['pareto_png']}` (accuracy / KD-on-real against synthesis seconds)"]
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
    ap.add_argument("--seeds", default=None, help="seed offsets of the KD table, e.g. 0,1 (default: 0,1; quick 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (e.g. 1 per process when "
                    "seeds run as parallel processes)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge the KD runs of these quality json files (one per seed process) into --out and exit")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    p = dict(QUICK if args.quick else FULL)
    if args.num_images:
        p["num_images"] = args.num_images
    if args.seeds:
        p["seeds"] = args.seeds
    os.makedirs(args.out, exist_ok=True)
    res: dict[str, Any] = {"quick": args.quick, "params": p, "command": " ".join([sys.executable, *sys.argv]),
                           "date": datetime.datetime.now().isoformat(timespec="seconds"),
                           "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
                                       f"threads {torch.get_num_threads()}, "
                                       f"{platform.processor() or platform.machine()}",
                           "_out": args.out, "errors": {}}
    t0 = time.perf_counter()
    if args.merge:
        parts = [json.load(open(f)) for f in args.merge]
        res["kd_runs"] = [r for part in parts for r in part.get("kd_runs", [])]
        res["teachers"] = parts[0]["teachers"]
        res["params"] = parts[0]["params"]
        res["versions"] = parts[0]["versions"] + f" ({len(parts)} processes, one per seed)"
        res["merged_from"] = [{"file": f, "command": p_["command"], "date": p_["date"], "total_s": p_.get("total_s")}
                              for f, p_ in zip(args.merge, parts, strict=True)]
        summarize_kd(res)
        args.sections = ""
        res["total_s"] = max(p_.get("total_s", 0) for p_ in parts)
    sections = {"kd": section_kd_table, "robustness": section_robustness, "uda": section_uda, "ci": section_ci}
    for name in filter(None, args.sections.split(",")):
        _log(f"section {name}")
        try:
            sections[name](p, args.seed, res)
        except Exception:  # record the failure in the results and continue with the next section
            res["errors"][name] = traceback.format_exc()
            _log(f"section {name} failed:\n{res['errors'][name]}")
        res["total_s"] = time.perf_counter() - t0
    stem = "quality_cpu_quick" if args.quick else "quality_cpu"
    old = os.path.join(args.out, stem + ".json")
    if os.path.isfile(old):  # sections not re-run keep their earlier results (and say when they ran)
        with open(old) as f:
            prev = json.load(f)
        for key in ("robustness", "uap", "uda", "class_incremental"):
            if key not in res and key in prev:
                res[key] = prev[key]
                res.setdefault("kept_from", {})[key] = prev.get("date")
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
