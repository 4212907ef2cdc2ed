"""`make demo`: AGVM on this machine (CPU, generated data): train, measure Phi, and check the variance diagnosis.

Everything trains through the repository's one training entry point (``agvm.mm.train.train``) with the Table 1
configs (``configs/faster_rcnn/faster_rcnn_r50_bs{32,512}_agvm_sgd.py``), scaled down: a small Faster R-CNN
(ResNet-18, 64-channel FPN, random initialisation) on a fresh stream of generated 64x64 images
(``agvm.mm.synthetic.SyntheticStream``: no image is seen twice, so nothing is memorised), evaluated on fixed
held-out images (COCO box AP through pycocotools).

1. Training: SGD at a small and at a large batch and AGVM-SGD at the large batch, each with 3 seeds, the same
   number of images per run (the paper compares at equal epochs), learning rates from Table 1's rule
   (``agvm.sgd_lr``). "SGD" is AGVM-SGD with the modulation off (mu held at 1: SGD's update), so it logs Phi.
2. Diagnosis (``agvm.mm.diagnose``): per-image gradients at checkpoints of the SGD runs predict every module's
   Phi at any batch; checked against Phi measured directly at held-out batch sizes (same weights) and against
   the Phi the runs measured while training.
3. The Fig. 4 ablations as diagnosis runs: a Faster R-CNN without FPN (trained like the SGD large-batch run),
   then with 10 proposals, then with a frozen detection head: how each moves the modules' NSR.

Writes ``results/demo/summary.json``, ``report.md`` and figures; runs in ``work_dirs/demo/``. Two worker processes
(``--jobs``) with one torch thread each.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T_START = time.time()
SMALL_CFG = "configs/faster_rcnn/faster_rcnn_r50_bs32_agvm_sgd.py"
LARGE_CFG = "configs/faster_rcnn/faster_rcnn_r50_bs512_agvm_sgd.py"
DIAG_STREAM_SEED = 999  # the diagnosis' images: a stream no training run reads (runs read 1000 + seed)


_CONSOLE = None  # where say() prints while a training task sends its own output to the run's console.log


def say(msg: str) -> None:
    print(f"[demo {time.time() - T_START:6.0f}s] {msg}", file=_CONSOLE or sys.stdout, flush=True)


def tiny_model_options(rois: int = 64, proposals: int = 100) -> dict:
    """A small Faster R-CNN: ResNet-18, FPN with 64 channels (random init: nothing is downloaded); ``rois`` RoIs
    sampled per image for the detection head (mmdet's default is 512) and ``proposals`` RPN proposals kept."""
    return {
        "model.backbone.depth": 18, "model.backbone.init_cfg": None,
        "model.neck.in_channels": [64, 128, 256, 512], "model.neck.out_channels": 64,
        "model.rpn_head.in_channels": 64, "model.rpn_head.feat_channels": 64,
        "model.roi_head.bbox_roi_extractor.out_channels": 64, "model.roi_head.bbox_head.in_channels": 64,
        "model.train_cfg.rpn_proposal.nms_pre": max(200, proposals),
        "model.train_cfg.rpn_proposal.max_per_img": proposals,
        "model.train_cfg.rcnn.sampler.num": rois,
        "model.test_cfg.rpn.nms_pre": 200, "model.test_cfg.rpn.max_per_img": 50,
        "model.roi_head.bbox_head.fc_out_channels": 128,
    }


# Fig. 4's ablations (experiments/fig1_4_variance) at the demo's size: cumulative, as in the appendix.
NO_FPN = {  # detection on C5 alone: a 1x1 channel mapper instead of the FPN, anchors and RoIs at stride 32
    "model.backbone.out_indices": [3],
    "model.neck": {"_delete_": True, "type": "ChannelMapper", "in_channels": [512], "out_channels": 64,
                   "kernel_size": 1, "num_outs": 1},
    "model.rpn_head.anchor_generator.strides": [32], "model.rpn_head.anchor_generator.scales": [1, 2, 4, 8, 16],
    "model.roi_head.bbox_roi_extractor.featmap_strides": [32],
}
ABLATIONS = [("FPN", {}), ("no FPN", NO_FPN),
             ("no FPN, 10 RoIs", {**NO_FPN, "model.train_cfg.rcnn.sampler.num": 10}),
             ("no FPN, 10 RoIs, frozen head", {**NO_FPN, "model.train_cfg.rcnn.sampler.num": 10,
                                               "optim_wrapper.paramwise_cfg.frozen_modules": ["bbox_head"]})]


def run_options(a, batch: int, agvm_on: bool, seed: int, iters: int, checkpoints: int, extra: dict) -> dict:
    """cfg_options turning a Table 1 config into a demo run of ``iters`` iterations (one pass over a fresh stream)."""
    import agvm

    warm = max(1, iters // 6)  # the configs warm up over 1-2 of 12 epochs: keep the proportion
    o = {
        "dataset": "synthetic", "synthetic_root": a.data_root, "synthetic_image_size": a.size,
        "synthetic_stream": dict(length=iters * batch, seed=1000 + seed),
        "train_dataloader.batch_size": batch, "train_cfg.max_epochs": 1, "train_cfg.val_interval": 1,
        "optim_wrapper.optimizer.lr": round(agvm.sgd_lr(batch), 6),
        "optim_wrapper.optimizer.interval": a.tau, "optim_wrapper.optimizer.alpha": a.alpha,
        "param_scheduler": [
            dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=warm),
            dict(type="MultiStepLR", by_epoch=False, begin=0, end=iters,
                 milestones=[max(warm + 1, iters * 8 // 12), max(warm + 2, iters * 11 // 12)], gamma=0.1)],
        "default_hooks.checkpoint": dict(type="CheckpointHook", by_epoch=False, save_last=checkpoints > 0,
                                         interval=max(1, iters // checkpoints) if checkpoints else 10 ** 9),
        "default_hooks.logger.interval": 10 ** 6, "log_level": "WARNING", "randomness": dict(seed=seed),
        "custom_hooks": [dict(type="AGVMHook"), dict(type="DemoProgressHook", every=max(1, iters // 8))],
    }
    if not agvm_on:
        o["optim_wrapper.optimizer.start_iter"] = 10 ** 9  # mu stays 1: SGD's update, Phi still measured
    o.update(tiny_model_options(a.rois, a.proposals))
    o.update(extra)
    return o


# -- the two kinds of task, run in worker processes ------------------------------------------------------------
def _init_worker(threads: int) -> None:
    import agvm._compat

    agvm._compat.apply()
    import torch

    torch.set_num_threads(threads)
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    from agvm.mm import register_all

    register_all()

    class DemoProgressHook(Hook):
        """One line every ``every`` iterations: loss, s/iter, ETA (the runs' progress)."""

        priority = "VERY_LOW"

        def __init__(self, every: int = 1):
            self.every, self.t0, self.label = every, 0.0, ""

        def before_train(self, runner) -> None:
            self.t0, self.label = time.time(), Path(runner.work_dir).name

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            it, total = runner.iter + 1, runner.max_iters
            if it % self.every and it != total:
                return
            loss = outputs.get("loss", float("nan")) if outputs else float("nan")
            loss = float(loss.detach() if hasattr(loss, "detach") else loss)
            per = (time.time() - self.t0) / it
            say(f"{self.label}: iter {it}/{total}  loss {loss:.3f}  {per:.2f} s/iter  ETA {per * (total - it):.0f}s")

    HOOKS.register_module(module=DemoProgressHook, force=True)


def _task(kind: str, kw: dict) -> dict:
    t0 = time.time()
    if kind == "train":
        from agvm.mm.train import train

        global _CONSOLE
        os.makedirs(kw["work_dir"], exist_ok=True)
        _CONSOLE = sys.stdout  # the progress lines stay on the console; pycocotools' tables go to console.log
        try:
            with open(os.path.join(kw["work_dir"], "console.log"), "w") as log, contextlib.redirect_stdout(log):
                out = {"metrics": train(kw["config"], kw["work_dir"], kw["options"], resume=False)}
        finally:
            _CONSOLE = None
    else:
        from agvm.mm.diagnose import run

        out = {"diagnosis": run(kw["config"], kw["images"], kw["checkpoint"], kw["out"], kw["options"],
                                kw.get("validate", ()), kw.get("repeats", 4), anchor="backbone",
                                batches=kw["batches"])}
        out["diagnosis"].pop("cfg_options", None)
    return {**kw, **out, "seconds": time.time() - t0}


def run_tasks(tasks: List[tuple], jobs: int, threads: int) -> List[dict]:
    """Run (kind, kwargs) tasks, ``jobs`` at a time (each worker one process with ``threads`` torch threads)."""
    if jobs <= 1:
        _init_worker(threads)
        return [_task(kind, kw) for kind, kw in tasks]
    with mp.get_context("spawn").Pool(jobs, initializer=_init_worker, initargs=(threads,), maxtasksperchild=None) as pool:
        return pool.starmap(_task, tasks, chunksize=1)


# -- reading the results ------------------------------------------------------------------------------------------
def read_phi_log(work_dir: str) -> List[dict]:
    path = Path(work_dir) / "agvm_variance.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def window_phi(records: List[dict], module: str, center: int, half_width: int) -> Optional[float]:
    """Geometric mean of a module's measured Phi over the measurements within +-half_width iterations of center."""
    vals = [r["phi"][module] for r in records if abs(r["iter"] - center) <= half_width
            and isinstance(r["phi"].get(module), (int, float)) and r["phi"][module] > 0]
    return math.exp(statistics.fmean(math.log(v) for v in vals)) if vals else None


def mean_spread(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def load_avg() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load: " + " ".join(f"{v:.2f}" for v in os.getloadavg())


# -- figures ---------------------------------------------------------------------------------------------------------
def plot_overlay(runs: List[dict], diags: Dict[str, List[dict]], out: Path) -> str:
    """Per module: Phi measured while training (lines, per run) and predicted by the diagnoses at the runs'
    checkpoints for the run's batch (markers), against images seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = list(diags[runs[0]["name"]][0]["diagnosis"]["modules"])
    fig, axes = plt.subplots(1, len(modules), figsize=(3.6 * len(modules), 3.4), squeeze=False)
    for ax, m in zip(axes[0], modules):
        for k, r in enumerate(runs):
            recs = [x for x in read_phi_log(r["work_dir"]) if (x["phi"].get(m) or 0) > 0]
            xs = [x["iter"] * r["batch"] for x in recs]
            ys = [x["phi"][m] for x in recs]
            smooth = [math.exp(statistics.fmean(math.log(v) for v in ys[max(0, i - 4):i + 1])) for i in range(len(ys))]
            ax.plot(xs, smooth, color=f"C{k}", lw=1.2, alpha=0.8, label=f"measured, batch {r['batch']}")
            for d in diags[r["name"]]:
                pred = d["diagnosis"]["modules"][m]["phi"][d["diagnosis"]["batches"].index(r["batch"])]
                ax.plot([d["iter"] * r["batch"]], [pred], "D", color=f"C{k}", mec="black", ms=7,
                        label=f"predicted, batch {r['batch']}" if d is diags[r["name"]][0] else None)
        ax.set_yscale("log")
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("training images seen")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("Φ = 1 - cos(G_a, G_b)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Φ measured while training (moving geometric mean of 5) vs the diagnosis' prediction at checkpoints",
                 fontsize=10)
    fig.tight_layout()
    tmp = out / ".overlay.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out / "overlay.png")
    return "overlay.png"


# -- main --------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "results" / "demo"))
    ap.add_argument("--work-dir", default=str(REPO / "work_dirs" / "demo"))
    ap.add_argument("--size", type=int, default=64, help="image size of the generated data")
    ap.add_argument("--num-val", type=int, default=64, help="held-out evaluation images")
    ap.add_argument("--small-batch", type=int, default=4)
    ap.add_argument("--large-batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=960, help="training images per run (fresh: none seen twice)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rois", type=int, default=64, help="RoIs sampled per image for the detection head (mmdet: 512)")
    ap.add_argument("--proposals", type=int, default=100, help="RPN proposals kept per image in training (mmdet: 1000)")
    ap.add_argument("--tau", type=int, default=2)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--diag-images", type=int, default=64, help="per-image gradients per diagnosis")
    ap.add_argument("--validate-images", type=int, default=128,
                    help="per-image gradients of the diagnosis checked against measured Phi (the end of sgd_large)")
    ap.add_argument("--checkpoints", type=int, default=2, help="diagnosed checkpoints per SGD run (seed 0)")
    ap.add_argument("--validate", default="4,16,32", help="batch sizes at which Phi is measured directly")
    ap.add_argument("--repeats", type=int, default=6, help="per validation batch size: 2 x REPEATS half-batches, "
                    "1 - cos averaged over all their pairs")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    a = ap.parse_args(argv)
    validate = [int(v) for v in a.validate.split(",") if v.strip()]
    if any(b < 2 or b % 2 for b in validate):  # checked before training, not after
        ap.error(f"--validate takes even batch sizes >= 2 (two halves of b / 2 images each), got {a.validate}")
    if min(a.small_batch, a.large_batch) < 2 or a.images < a.large_batch:
        ap.error(f"each run needs at least one step: --images ({a.images}) >= --large-batch ({a.large_batch}), and "
                 f"batches >= 2 (got {a.small_batch}, {a.large_batch})")
    if min(a.diag_images, a.validate_images) < 2 or min(a.seeds, a.repeats, a.jobs, a.threads, a.tau) < 1:
        ap.error("--diag-images and --validate-images must be >= 2; --seeds, --repeats, --jobs, --threads, --tau >= 1")
    out, work = Path(a.out), Path(a.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    a.data_root = str(work / f"val_{a.num_val}x{a.size}")
    for c in (SMALL_CFG, LARGE_CFG):
        if not (REPO / c).is_file():
            raise SystemExit(f"error: config {c} is missing (generate the configs: python configs/generate.py)")
    say(f"AGVM demo on {a.jobs} worker process(es); load: {load_avg()}")
    from agvm.diagnose import PAPER_BATCHES
    from agvm.mm.synthetic import make_all

    if not (Path(a.data_root) / "done.json").exists():
        say(f"generating {a.num_val} held-out evaluation images ({a.size}x{a.size}) in {a.data_root}")
        make_all(a.data_root, num_train=1, num_val=a.num_val, image_size=a.size, seed=0)

    # 1. training: 3 settings x seeds, plus the no-FPN model for the Fig. 4 diagnoses
    settings = [("sgd_small", SMALL_CFG, a.small_batch, False), ("sgd_large", LARGE_CFG, a.large_batch, False),
                ("agvm_large", LARGE_CFG, a.large_batch, True)]
    runs = []
    for seed in range(a.seeds):
        for name, cfg, batch, on in settings:
            ck = a.checkpoints if seed == 0 and not on else 0
            runs.append(dict(name=f"{name}_seed{seed}", setting=name, config=str(REPO / cfg), batch=batch, agvm=on,
                             seed=seed, iters=a.images // batch, checkpoints=ck))
    runs.append(dict(name="sgd_large_no_fpn_seed0", setting="sgd_large_no_fpn", config=str(REPO / LARGE_CFG),
                     batch=a.large_batch, agvm=False, seed=0, iters=a.images // a.large_batch, checkpoints=1))
    for r in runs:
        extra = NO_FPN if r["setting"] == "sgd_large_no_fpn" else {}
        r.update(work_dir=str(work / r["name"]), lr=round(__import__("agvm").sgd_lr(r["batch"]), 6),
                 options=run_options(a, r["batch"], r["agvm"], r["seed"], r["iters"], r["checkpoints"], extra))
    order = sorted(runs, key=lambda r: (-r["iters"] * r["batch"] - r["iters"] * 4, r["name"]))  # long ones first
    say(f"training {len(runs)} runs ({a.images} fresh images each): " + ", ".join(r["name"] for r in order))
    t_train = time.time()
    trained = {t["name"]: t for t in run_tasks([("train", r) for r in order], a.jobs, a.threads)}
    train_seconds = time.time() - t_train
    for r in runs:
        r.update(metrics=trained[r["name"]]["metrics"], seconds=trained[r["name"]]["seconds"])
        ap_ = r["metrics"].get("coco/bbox_mAP")
        say(f"{r['name']}: box AP {'-' if ap_ is None else f'{100 * ap_:.1f}'} ({r['seconds']:.0f} s)")

    # 2.-3. diagnoses: checkpoints of the SGD seed-0 runs (the last one validated), the Fig. 4 variants
    def diag_options(run: dict, extra: dict, n: int) -> dict:
        o = {k: v for k, v in run["options"].items() if not k.startswith(("custom_hooks", "default_hooks"))}
        o.update(synthetic_stream=dict(length=n, seed=DIAG_STREAM_SEED), **extra)
        return o

    needed = a.validate_images + sum(2 * (b // 2) * a.repeats for b in validate)
    batches = sorted({*PAPER_BATCHES, a.small_batch, a.large_batch, *validate})
    tasks = []
    for r in runs:
        if r["setting"] in ("sgd_small", "sgd_large") and r["checkpoints"]:
            iters = sorted(int(p.stem.split("_")[1]) for p in Path(r["work_dir"]).glob("iter_*.pth"))
            for it in iters:
                last = it == iters[-1] and r["setting"] == "sgd_large"
                tasks.append(("diagnose", dict(
                    kind="checkpoint", run=r["name"], iter=it, config=r["config"],
                    images=a.validate_images if last else a.diag_images,
                    checkpoint=str(Path(r["work_dir"]) / f"iter_{it}.pth"),
                    out=str(work / "diagnosis" / f"{r['name']}_iter{it}"),
                    options=diag_options(r, {}, needed if last else a.diag_images),
                    validate=validate if last else (), repeats=a.repeats, batches=batches)))
    base, no_fpn = runs[1], runs[-1]  # sgd_large_seed0, sgd_large_no_fpn_seed0
    for label, extra in ABLATIONS:
        label = f"FPN, {a.rois} RoIs" if label == "FPN" else label
        src = base if not extra else no_fpn
        ckpt = max(Path(src["work_dir"]).glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
        tasks.append(("diagnose", dict(kind="ablation", label=label, run=src["name"], config=src["config"],
                                       images=a.diag_images, checkpoint=str(ckpt),
                                       out=str(work / "diagnosis" / ("ablation_" + label.replace(", ", "_")
                                                                     .replace(" ", "_"))),
                                       options=diag_options(src, extra, a.diag_images), batches=batches)))
    say(f"{len(tasks)} diagnoses ({a.diag_images} per-image gradients each; the last checkpoint of {base['name']} "
        f"with {a.validate_images}, also measured directly at batches {validate})")
    t_diag = time.time()
    diagnosed = run_tasks(tasks, a.jobs, a.threads)
    diag_seconds = time.time() - t_diag
    wall = time.time() - T_START
    load = load_avg()
    write_outputs(a, out, runs, diagnosed, validate, wall, train_seconds, diag_seconds, load)
    say(f"done in {wall / 60:.1f} min ({load})")
    print(f"\nReport:  {out / 'report.md'}\nSummary: {out / 'summary.json'}\nRuns:    {work}/", flush=True)
    return 0


def write_outputs(a, out: Path, runs: List[dict], diagnosed: List[dict], validate: List[int], wall: float,
                  train_seconds: float, diag_seconds: float, load: str) -> None:
    from agvm.diagnose import Diagnosis
    from agvm.fileio import write_json_atomic

    small, large = a.small_batch, a.large_batch
    ckpt_diags: Dict[str, List[dict]] = {}
    for d in diagnosed:
        if d["kind"] == "checkpoint":
            ckpt_diags.setdefault(d["run"], []).append(d)
    main_diag = next(d for d in diagnosed if d["kind"] == "checkpoint" and d.get("validate"))
    dj = main_diag["diagnosis"]
    modules = list(dj["modules"])
    dg = Diagnosis.from_dict(dj)

    # AP per setting over seeds
    table = {}
    for setting in ("sgd_small", "sgd_large", "agvm_large"):
        rs = [r for r in runs if r["setting"] == setting]
        aps = [100 * r["metrics"].get("coco/bbox_mAP", float("nan")) for r in rs]
        table[setting] = {"batch": rs[0]["batch"], "optimizer": "AGVM-SGD" if rs[0]["agvm"] else "SGD",
                          "lr": rs[0]["lr"], "iterations": rs[0]["iters"], "ap": mean_spread(aps),
                          "ap50": mean_spread([100 * r["metrics"].get("coco/bbox_mAP_50", float("nan")) for r in rs])}

    # prediction vs Phi measured during training (window of +-10 % of the run around each diagnosed checkpoint)
    train_rows = []
    for name, ds in ckpt_diags.items():
        r = next(x for x in runs if x["name"] == name)
        recs = read_phi_log(r["work_dir"])
        for d in ds:
            pred = d["diagnosis"]["modules"]
            k = d["diagnosis"]["batches"].index(r["batch"])
            for m in modules:
                meas = window_phi(recs, m, d["iter"], max(a.tau, r["iters"] // 10))
                if meas:
                    train_rows.append({"run": name, "iter": d["iter"], "batch": r["batch"], "module": m,
                                       "measured": meas, "predicted": pred[m]["phi"][k],
                                       "rel_error": abs(pred[m]["phi"][k] - meas) / meas})
    direct = dj["validation"]
    agvm_runs = [r for r in runs if r["setting"] == "agvm_large"]
    finals = [read_phi_log(r["work_dir"])[-1]["mu"] for r in agvm_runs if read_phi_log(r["work_dir"])]
    agvm_mu = {m: statistics.fmean(f[m] for f in finals if f.get(m) is not None) for m in modules
               if any(f.get(m) is not None for f in finals)}
    large_log = read_phi_log(runs[1]["work_dir"])
    small_log = read_phi_log(runs[0]["work_dir"])
    end_large = runs[1]["iters"]
    per_module = {}
    for m in modules:
        per_module[m] = {
            "nsr": dj["modules"][m]["nsr"],
            "phi_predicted": {str(small): dg.phi(small)[m], str(large): dg.phi(large)[m]},
            "phi_measured_direct": {str(b): next((r["measured"] for r in direct["rows"]
                                                  if r["batch"] == b and r["module"] == m), None) for b in validate},
            "phi_measured_training": {
                str(small): window_phi(small_log, m, runs[0]["iters"], max(a.tau, runs[0]["iters"] // 10)),
                str(large): window_phi(large_log, m, end_large, max(a.tau, end_large // 10))},
            "mu_predicted": dg.mu(large)[m], "mu_agvm_run_final": agvm_mu.get(m),
        }
    ablations = {d["label"]: {m: v["nsr"] for m, v in d["diagnosis"]["modules"].items()}
                 for d in diagnosed if d["kind"] == "ablation"}
    head = "bbox_head" if "bbox_head" in modules else modules[-1]
    verdict = {
        "anchor": dg.anchor,
        "ratio_at": {str(b): dg.ratio(b) for b in (small, large, 32, 512)},
        "limit_ratio": {m: dj["modules"][m]["limit_ratio"] for m in modules},
        "misaligned_at_batch": dj["misaligned_at"],
        "misaligned_at_batch_per_module": {
            m: {f"{f:g}x": (lambda b: None if math.isinf(b) else b)(dg.batch_at_ratio(f, m)) for f in (2.0, 4.0)}
            for m in modules if m != dg.anchor},
        "head_nsr_needed_for_4x_at_512": dg.nsr_for_ratio(4.0, 512),
        "head_nsr": dg.nsr[head],
    }
    summary = {
        "settings": {k: v for k, v in vars(a).items()},
        "wall_seconds": wall, "train_seconds": train_seconds, "diagnosis_seconds": diag_seconds, "load": load,
        "runs": [{"name": r["name"], "setting": r["setting"], "seed": r["seed"], "batch": r["batch"],
                  "optimizer": "AGVM-SGD" if r["agvm"] else "SGD", "lr": r["lr"], "iterations": r["iters"],
                  "ap": 100 * r["metrics"].get("coco/bbox_mAP", float("nan")),
                  "ap50": 100 * r["metrics"].get("coco/bbox_mAP_50", float("nan")), "seconds": r["seconds"]}
                 for r in runs],
        "table": table, "modules": per_module,
        "prediction": {"direct": {"batches": validate, "repeats": a.repeats, "halves": direct["halves"],
                                  "pairs": direct["pairs"], "rows": direct["rows"],
                                  "median_rel_error": direct["median_rel_error"]},
                       "training": {"rows": train_rows, "median_rel_error":
                                    statistics.median(r["rel_error"] for r in train_rows) if train_rows else None}},
        "ablations_nsr": ablations, "verdict": verdict,
    }
    write_json_atomic(out / "summary.json", summary)
    figs = [plot_overlay([runs[0], runs[1]], ckpt_diags, out)]
    dg.plot(str(out / "diagnosis.png"), measured={m: {b: per_module[m]["phi_measured_direct"][str(b)] for b in validate
                                                      if per_module[m]["phi_measured_direct"][str(b)]}
                                                  for m in modules},
            title=f"Predicted Φ_i(b) at the end of {runs[1]['name']} (lines); measured directly (points)")
    figs.append("diagnosis.png")
    from results.figures import load_variance_log, plot_mu, plot_phi

    logs = [load_variance_log(r["work_dir"], f"{'AGVM-SGD' if r['agvm'] else 'SGD'} ({r['batch']})") for r in runs[:3]]
    figs.append(plot_phi(logs, out / "phi.png", smooth=5, title="Φ per module while training (seed 0)").name)
    figs.append(plot_mu(logs[2:], out / "mu.png", title="AGVM modulation μ per module, large batch (seed 0)").name)
    write_report(out, summary, figs)


def write_report(out: Path, s: dict, figs: List[str]) -> None:
    """report.md from summary.json's numbers only."""
    from results.figures import MODULE_LABELS

    a = s["settings"]
    lab = lambda m: MODULE_LABELS.get(m, m)  # noqa: E731
    f1 = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"  # noqa: E731
    g3 = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
    small, large = a["small_batch"], a["large_batch"]
    lines = [
        "# AGVM demo: training, measured Phi, and the variance diagnosis (CPU, generated data)",
        "",
        f"A small Faster R-CNN (ResNet-18, 64-channel FPN, random initialisation, {a['rois']} RoIs, "
        f"{a['proposals']} proposals) trained through `agvm.mm.train.train` with the Table 1 configs on a fresh "
        f"stream of generated {a['size']}x{a['size']} images ({a['images']} per run, none seen twice), evaluated on "
        f"{a['num_val']} held-out images. Batch {small} and {large} stand in for the paper's 32 and 512; learning "
        f"rates from Table 1's rule (`agvm.sgd_lr`); tau = {a['tau']}, alpha = {a['alpha']}. This is a scaled-down "
        "run: it measures this model on this data, not the paper's models or numbers.",
        "",
        f"Wall time: {s['wall_seconds'] / 60:.1f} min (training {s['train_seconds']:.0f} s, diagnoses "
        f"{s['diagnosis_seconds']:.0f} s, {a['jobs']} worker processes); machine load at the end: `{s['load']}`.",
        "",
        f"## Box AP ({len([r for r in s['runs'] if r['setting'] == 'sgd_small'])} seeds each)",
        "",
        "| run | batch | optimizer | lr | iterations | box AP mean | std | min-max | AP50 mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in s["table"].items():
        ap = t["ap"]
        lines.append(f"| {name} | {t['batch']} | {t['optimizer']} | {t['lr']:g} | {t['iterations']} | {f1(ap['mean'])} "
                     f"| {f1(ap['std'])} | {f1(ap['min'])}-{f1(ap['max'])} | {f1(t['ap50']['mean'])} |")
    lines += ["", "Per seed: " + "; ".join(f"{r['name']} {f1(r['ap'])}" for r in s["runs"]
                                           if r["setting"] != "sgd_large_no_fpn") + ".",
              "SGD = AGVM-SGD with mu held at 1 (the same update as SGD), so that it measures Phi.", ""]
    pd, pt = s["prediction"]["direct"], s["prediction"]["training"]
    lines += [
        "## The diagnosis against measured Phi",
        "",
        f"NSR per module from {a['validate_images']} per-image gradients at the end of sgd_large_seed0; predicted "
        "Phi_i(b) = x / (1 + x), x = 2 NSR_i / b; measured Phi = 1 - cos of two half-batches of fresh images at the "
        f"same weights, averaged over all {pd['pairs']} pairs of {pd['halves']} halves per batch (+- its standard error, "
        "bounded by the disjoint pairs' spread), and, separately, the Phi the SGD runs logged while training "
        "(geometric mean over +-10 % of the run around each diagnosed checkpoint).",
        "",
        "| module | NSR | " + " | ".join(f"Phi@{b} pred / meas" for b in pd["batches"]) +
        f" | Phi@{small} training (sgd_small end) | Phi@{large} training (sgd_large end) | mu@{large} predicted | mu AGVM run (end, mean of seeds) |",
        "|---|---|" + "---|" * len(pd["batches"]) + "---|---|---|---|",
    ]
    for m, v in s["modules"].items():
        cells = []
        for b in pd["batches"]:
            row = next((r for r in pd["rows"] if r["batch"] == b and r["module"] == m), None)
            se = "" if row is None or row.get("measured_se") is None else f" ± {row['measured_se']:.2g}"
            cells.append("–" if row is None else f"{row['predicted']:.3g} / {row['measured']:.3g}{se}")
        lines.append(f"| {lab(m)} | {g3(v['nsr'])} | " + " | ".join(cells) + " | "
                     f"{g3(v['phi_measured_training'][str(small)])} | {g3(v['phi_measured_training'][str(large)])} | "
                     f"{v['mu_predicted']:.2f} | {g3(v['mu_agvm_run_final'])} |")
    med = lambda v: "–" if v is None else f"{100 * v:.0f} %"  # noqa: E731
    above = sum(r["predicted"] > r["measured"] for r in pd["rows"])
    within = sum(r.get("measured_se") is not None and abs(r["predicted"] - r["measured"]) <= 2 * r["measured_se"]
                 for r in pd["rows"])
    lines += ["", f"Median relative error of the prediction: {med(pd['median_rel_error'])} against the direct "
              f"measurements ({len(pd['rows'])} module x batch values; {above} predictions above the measurement, "
              f"{within} within two standard errors of it; x / (1 + x) is the ratio of the expected dot product and "
              "norms, and the mean of 1 - cos over pairs sits a little below it when the halves' norms vary), "
              f"{med(pt['median_rel_error'])} against the "
              f"Phi logged during training ({len(pt['rows'])} values at {len({(r['run'], r['iter']) for r in pt['rows']})} "
              "checkpoints; the weights move within the window). Figures: `overlay.png`, `diagnosis.png`.", ""]
    v = s["verdict"]
    abl = s["ablations_nsr"]
    mods = list(s["modules"])
    lines += ["## Fig. 4's ablations as diagnoses: NSR per module", "",
              "FPN row: the end of sgd_large_seed0; the others: the end of a no-FPN model trained the same way "
              "(sgd_large_no_fpn_seed0), diagnosed as is, with 10 RoIs per image, and with the detection head frozen "
              "(cumulative, as in the appendix). Lower NSR = less noisy per image.", "",
              "| variant | " + " | ".join(lab(m) for m in mods) + f" | NSR {lab(mods[0])} / NSR {lab(mods[-1])} |",
              "|---|" + "---|" * (len(mods) + 1)]
    for label, nsr in abl.items():
        last = nsr.get(mods[-1])
        ratio = "–" if not last or nsr.get(mods[0]) is None else f"{nsr[mods[0]] / last:.2f}"
        lines.append(f"| {label} | " + " | ".join(g3(nsr.get(m)) for m in mods) + f" | {ratio} |")
    cross = v["misaligned_at_batch"]
    def fmt(b):
        if b is None:
            return "never"
        return f"at every batch size (from b = {b:.2g})" if b < 2 else f"from batch {b:.0f}"

    per = v.get("misaligned_at_batch_per_module", {})
    lines += ["", "## Verdict (numbers from the diagnosis at the end of sgd_large_seed0)", "",
              f"- Predicted ratio Phi_{v['anchor']} / Phi_module: " + "; ".join(
                  f"at {b}: " + ", ".join(f"{lab(m)} {r:.2f}" for m, r in rs.items() if m != v["anchor"])
                  for b, rs in v["ratio_at"].items()) + ".",
              f"- Limits at large batch (NSR_backbone / NSR_module): " + ", ".join(
                  f"{lab(m)} {g3(r)}" for m, r in v["limit_ratio"].items() if m != v["anchor"]) + ".",
              f"- The largest ratio between the anchor and a module reaches 2x {fmt(cross['2x'])} and 4x "
              f"{fmt(cross['4x'])}" + (" (" + "; ".join(f"{lab(m)}: 2x {fmt(c['2x'])}, 4x {fmt(c['4x'])}"
                                                       for m, c in per.items()) + ")" if per else "") + ".",
              f"- The paper's Fig. 1 (detection head >= 4x below the backbone at 512) would need the head's NSR at or "
              f"below {v['head_nsr_needed_for_4x_at_512']:.3g} with this backbone; it is {g3(v['head_nsr'])}.",
              "", "## Figures", ""] + [f"![{f}]({f})" for f in figs] + [
              "", "Reproduce: `make demo` (`python scripts/demo.py --help` for the sizes). Runs, checkpoints and the "
              "diagnoses' JSON/PNG are in `work_dirs/demo/`.", ""]
    from agvm.fileio import write_text_atomic

    write_text_atomic(out / "report.md", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
