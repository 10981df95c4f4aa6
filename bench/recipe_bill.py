"""The recipe's bill: what each full training stage, the extraction and the kNN cost, per GPU count.

    bash bench/recipe_bill.sh                 # on a GPU box: the real sizes (see docs/training.md)
    bash bench/recipe_bill.sh --smoke         # CPU, toy sizes, < 2 minutes: proves the script end to end

Why: only stage 1 was ever timed on a GPU. This runs every stage of the recipe for a few steps at its
real input size and per-GPU batch -- the real EfficientNetV2-M (random init: timing only), AMP, SyncBatchNorm
+ DDP (the training loop's ``wrap_model`` in a one-process group), the project's own dataset, views
and collate (``isc.train.parts.build_dataset``) in DataLoader workers reading synthetic DISC21-shaped JPEGs
-- and projects the wall time of the whole recipe on 1M training images for 1, 4 and 8 GPUs.

Per stage and GPU count G the per-GPU batch is the seed's global batch / G (stage 4: 1 pair per GPU plus
2G-2 reference negatives, v107). Each (stage, per-GPU batch) is measured three ways on one device:

* ``loader``: images/s the DataLoader (decode + views) delivers with ``--workers`` processes, no model;
* ``compute``: images/s of the training step (forward, XBM loss, backward, SGD, GradScaler) on one batch
  already on the device;
* ``step``: images/s of loader + step together over a few steps (a check; prefetched batches flatter
  it), and the peak device memory.

The projection's seconds per step is the slower of ``loader`` and ``compute`` in steady state.

Projection (printed with the table, stated again in docs/training.md): a G-GPU stage takes
``epochs x steps_per_epoch(G) x seconds_per_step(per-GPU batch)``; that assumes G GPUs each run the measured
per-GPU step in parallel (the all-reduce and the embedding all-gather are not measured on one device) and
that each GPU has as many CPU cores for its loader as the measuring box gave it (``--workers``). A
per-GPU batch that does not fit in memory is reported as ``OOM`` and that GPU count gets no total.

Extraction: ``isc.extract.streamed.extract_descriptors`` on synthetic JPEGs at 512 px, projected to 2M images
(DISC21's 1M references + 1M training images) divided over G GPUs. kNN: exact inner-product top-10 of
50k queries x 1M references x 256-d, timed at full size (torch matmul + top-k on the GPU; the project's
faiss ``isc.knn.knn`` on a query subsample, projected to 50k).

Imports torch, timm, numpy, PIL, h5py, AugLy (the views) and faiss -- never MLflow or Optuna.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

V2M = "tf_efficientnetv2_m.in21k_ft_in1k"
PUBLIC_PAIRS = 4991  # positive pairs of DISC21's public_ground_truth.csv (v107 trains on all of them)


@dataclass(frozen=True)
class Stage:
    """One stage as the seed ran it (reproduce_experiments.md; ../shared/design/recipe.md)."""

    name: str
    config: str  # the packaged config whose views/loss settings the dataset and loss are built from
    px: int
    epochs: int  # epochs the seed ran in this stage (1b: epochs 5..9 of the resumed run)
    global_items: int | None  # items per optimizer step over all GPUs; None = one pair per GPU (v107)
    negatives: int | None  # reference negatives per item; None = 2G - 2 (v107)
    items_per_epoch: int


REAL_STAGES = (
    Stage("1a", "stage1.yaml", 256, 5, 128, 0, 1_000_000),
    Stage("1b", "stage1b.yaml", 256, 5, 128, 0, 1_000_000),
    Stage("2", "stage2.yaml", 384, 7, 128, 0, 1_000_000),
    Stage("3", "stage3.yaml", 512, 3, 64, 2, 1_000_000),
    Stage("4", "stage4.yaml", 512, 10, None, None, PUBLIC_PAIRS),
)
# --smoke: the same code at toy sizes on the CPU (the projection still uses the real counts).
SMOKE = dict(backbone="test_efficientnet", px_div=8, items_div=16, steps=2, warmup=1, workers=1, images=48,
             extract_px=64, extract_images=48, extract_batch=16, nq=200, nb=5000, knn_cpu_nq=100, gpus=(1, 4))
REAL = dict(backbone=V2M, px_div=1, items_div=1, steps=6, warmup=2, workers=12, images=1500, extract_px=512,
            extract_images=4096, extract_batch=64, nq=50_000, nb=1_000_000, knn_cpu_nq=2000, gpus=(1, 4, 8))


def per_gpu(stage: Stage, gpus: int, items_div: int = 1) -> tuple[int, int]:
    """(items, negatives per item) one GPU takes per step when the stage runs on ``gpus`` GPUs."""
    if stage.global_items is None:  # v107: 1 pair per process, 2G - 2 negatives per process
        return 1, 2 * gpus - 2
    return max(1, stage.global_items // items_div // gpus), int(stage.negatives or 0)


def steps_per_epoch(stage: Stage, gpus: int) -> int:
    if stage.global_items is None:  # DistributedSampler pads to ceil(n / G) items per rank, 1 per step
        return math.ceil(stage.items_per_epoch / gpus)
    return stage.items_per_epoch // stage.global_items  # drop_last


# ------------------------------------------------------------------------------------------- data


def make_disc21(root: Path, n: int, seed: int = 0) -> Path:
    """A DISC21-shaped folder: ``n`` training, ``n`` reference and ``n // 4`` query JPEGs of the dataset's
    typical shapes (landscape 640x480, portrait 480x640, square 512), plus ``public_ground_truth.csv``
    pairing each query with a reference. Returns the pairs file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(640, 480), (480, 640), (512, 512)]
    for folder, prefix, count in (("training_images", "T", n), ("reference_images", "R", n),
                                  ("query_images", "Q", max(2, n // 4))):
        (root / folder).mkdir(parents=True, exist_ok=True)
        digits = 5 if prefix == "Q" else 6
        for i in range(count):
            w, h = shapes[i % len(shapes)]
            small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
            img.save(root / folder / f"{prefix}{i:0{digits}d}.jpg", quality=90)
    pairs = root / "public_ground_truth.csv"
    with open(pairs, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query_id", "reference_id"])
        for i in range(max(2, n // 4)):
            writer.writerow([f"Q{i:05d}", f"R{i:06d}"])
    return pairs


# --------------------------------------------------------------------------------------- measuring


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Cell:
    """One (stage, per-GPU batch) measurement."""

    stage: str
    px: int
    items: int
    negatives: int
    images: int  # images per GPU per step
    loader: float = float("nan")  # images/s
    compute: float = float("nan")
    step: float = float("nan")
    seconds_per_step: float = float("nan")
    peak_gib: float = float("nan")
    error: str = ""


def _build(stage: Stage, root: Path, pairs: Path, sz: dict, items: int, negatives: int, device):
    """The stage's config, the project's dataset + loader, the wrapped model, loss, optimizer, scaler."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from isc.losses import build_loss
    from isc.models import create_model
    from isc.train import distributed as ddp
    from isc.train.config import load_config
    from isc.train.datasets import collate
    from isc.train.parts import build_dataset, param_groups

    px = stage.px // sz["px_div"]
    cfg = load_config(ROOT / "isc" / "configs" / stage.config, data=str(root), input_size=px,
                      backbone=sz["backbone"], pretrained=False, num_negatives=negatives,
                      batch_size=items, sample_size=sz["images"], workers=sz["workers"],
                      pairs=str(pairs) if stage.global_items is None else None)
    torch.manual_seed(0)
    net = create_model(cfg.backbone, pretrained=False, gem_p=cfg.gem_p, gem_eval_p=cfg.gem_eval_p,
                       input_size=px).to(device)
    dataset, _facts = build_dataset(cfg, net.model_config["mean"], net.model_config["std"])
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = DataLoader(dataset, batch_size=items, sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.workers > 0)
    model = ddp.wrap_model(net, device).train()  # SyncBatchNorm on CUDA, DDP: the loop's wrapping
    criterion = build_loss(cfg).to(device)
    optimizer = torch.optim.SGD(param_groups(model, cfg.wd), lr=cfg.lr, momentum=cfg.momentum)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return model, criterion, optimizer, scaler, loader


def _train_step(model, criterion, optimizer, scaler, images, labels, device) -> float:
    """The training loop's step (isc.train.loop): AMP forward, loss, scaled backward, SGD step."""
    import torch

    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        emb = model(images)
    loss = criterion(emb, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss * getattr(criterion, "grad_scale", 1.0)).backward()
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def measure_stage(stage: Stage, items: int, negatives: int, root: Path, pairs: Path, sz: dict, device) -> Cell:
    import torch

    px = stage.px // sz["px_div"]
    cell = Cell(stage.name, px, items, negatives, items * (2 + negatives))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _measure(cell, stage, items, negatives, root, pairs, sz, device)
    except torch.OutOfMemoryError:
        cell.error = "OOM"
    except Exception as exc:  # noqa: BLE001 -- one stage's failure must not hide the other figures
        traceback.print_exc()
        cell.error = f"{type(exc).__name__}: {str(exc)[:120]}"
    # after the except blocks: the failed frame (model, optimizer, activations) is released by now
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cell


def _measure(cell: Cell, stage: Stage, items: int, negatives: int, root: Path, pairs: Path, sz: dict,
             device) -> None:
    """Fill ``cell``: loader alone, the step alone, then both together (see the module doc)."""
    import torch

    model, criterion, optimizer, scaler, loader = _build(stage, root, pairs, sz, items, negatives, device)
    # one step on random images first: a per-GPU batch that does not fit fails here (OOM), before the
    # loader's workers spend a minute making views for it
    probe = torch.randn(cell.images, 3, cell.px, cell.px, device=device)
    _train_step(model, criterion, optimizer, scaler, probe, torch.arange(cell.images, device=device) // 2, device)
    del probe
    it = iter(loader)
    warm, steps = sz["warmup"], sz["steps"]
    # loader alone, in steady state: the first round (one batch per worker, all started together, worker
    # start-up included) is skipped, then as many batches as workers (or steps) are timed
    batches = [next(it) for _ in range(max(1, sz["workers"]))]
    n_loader = max(steps, sz["workers"])
    t0 = time.perf_counter()
    for _ in range(n_loader):
        next(it)
    cell.loader = n_loader * cell.images / (time.perf_counter() - t0)
    # compute alone: the same batch, already on the device
    images = batches[0][0].to(device, non_blocking=True)
    labels = batches[0][1].to(device, non_blocking=True)
    for _ in range(warm):
        _train_step(model, criterion, optimizer, scaler, images, labels, device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        _train_step(model, criterion, optimizer, scaler, images, labels, device)
    sync(device)
    cell.compute = steps * cell.images / (time.perf_counter() - t0)
    # loader + step, as training runs
    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels, _skipped = next(it)
        _train_step(model, criterion, optimizer, scaler, images.to(device, non_blocking=True),
                    labels.to(device, non_blocking=True), device)
    sync(device)
    cell.step = steps * cell.images / (time.perf_counter() - t0)
    # The projection's step time: the slower of the two in steady state. The short loader + step run above
    # is reported, not used: batches the workers prefetched during the compute run flatter it.
    cell.seconds_per_step = max(cell.images / cell.compute, cell.images / cell.loader)
    if device.type == "cuda":
        cell.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30


def measure_extraction(sz: dict, device, tmp: Path) -> dict:
    """images/s of the project's extraction (decode workers, resize, AMP forward, h5 write)."""
    import torch

    from bench.bench_extract import make_images
    from isc.data.disc21 import DISC21
    from isc.extract.streamed import extract_descriptors
    from isc.models import create_model

    root = tmp / "extract"
    make_images(root / "reference_images", sz["extract_images"], side=600)
    torch.manual_seed(0)
    model = create_model(sz["backbone"], pretrained=False, input_size=sz["extract_px"]).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = extract_descriptors(model, DISC21(root), "r", tmp / "extract_out", batch_size=sz["extract_batch"],
                              workers=sz["workers"], device=device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": float(res["images_per_second"]), "images": sz["extract_images"],
            "px": sz["extract_px"], "peak_gib": peak}


def measure_knn(sz: dict, device) -> dict:
    """Exact top-10 inner product, nq x nb x 256: torch on the device (full size) and the project's
    faiss search (isc.knn.knn, on whatever faiss finds) on a query subsample, projected to nq."""
    import torch

    nq, nb, d, k = sz["nq"], sz["nb"], 256, 10
    g = torch.Generator().manual_seed(0)
    xb = torch.nn.functional.normalize(torch.randn(nb, d, generator=g), dim=1)
    xq = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1)
    out: dict = {"nq": nq, "nb": nb, "d": d}
    xb_d, xq_d = xb.to(device), xq.to(device)
    sync(device)
    t0 = time.perf_counter()
    for q in torch.split(xq_d, 2048):
        torch.topk(q @ xb_d.T, k, dim=1)
    sync(device)
    out["torch_seconds"] = time.perf_counter() - t0
    out["torch_device"] = device.type
    del xb_d, xq_d
    try:
        from isc.knn import knn

        sub = sz["knn_cpu_nq"]
        t0 = time.perf_counter()
        knn(xq[:sub].numpy(), xb.numpy(), k, metric="ip")
        out["faiss_seconds_projected"] = (time.perf_counter() - t0) * nq / sub
    except ImportError as exc:
        out["faiss_seconds_projected"] = float("nan")
        out["faiss_error"] = str(exc)
    return out


# --------------------------------------------------------------------------------------- reporting


def project(stages, cells: dict, gpus_list, sz: dict) -> dict[int, dict[str, float]]:
    """Hours per stage and in total for each GPU count (NaN where the per-GPU batch failed)."""
    hours: dict[int, dict[str, float]] = {}
    for gpus in gpus_list:
        row = {}
        for st in stages:
            cell = cells[(st.name, gpus)]
            row[st.name] = (st.epochs * steps_per_epoch(st, gpus) * cell.seconds_per_step / 3600
                            if not cell.error else float("nan"))
        row["train"] = sum(row.values())
        hours[gpus] = row
    return hours


def fmt(x: float, spec: str = ".0f") -> str:
    return "-" if x != x else format(x, spec)


def print_report(stages, cells, hours, extraction, knn_res, gpus_list, smoke: bool, device_name: str) -> None:
    print(f"\nrecipe bill on {device_name}{' (SMOKE: toy sizes on CPU, the figures only prove the code runs)' if smoke else ''}")
    print("\n| stage | px | GPUs | per-GPU batch (items x images) | loader img/s | compute img/s | step img/s | "
          "peak GiB | s/step | stage hours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for st in stages:
        for gpus in gpus_list:
            c = cells[(st.name, gpus)]
            h = hours[gpus][st.name]
            print(f"| {st.name} | {c.px} | {gpus} | {c.items} x {2 + c.negatives} = {c.images} | {fmt(c.loader)} | "
                  f"{fmt(c.compute)} | {fmt(c.step)} | {fmt(c.peak_gib, '.1f')} | {fmt(c.seconds_per_step, '.3f')} "
                  f"| {c.error or fmt(h, '.1f')} |")
    ext_rate = extraction.get("images_per_s", float("nan"))
    if "error" in extraction or not extraction:
        print(f"\nextraction: {extraction.get('error', 'skipped')}")
    else:
        print(f"\nextraction: {fmt(ext_rate)} images/s per GPU ({extraction['images']} JPEGs at {extraction['px']} px, "
              f"peak {fmt(extraction['peak_gib'], '.1f')} GiB)")
    if "error" in knn_res or not knn_res:
        print(f"kNN: {knn_res.get('error', 'skipped')}")
    else:
        print(f"kNN top-10 {knn_res['nq']} x {knn_res['nb']} x 256: torch on {knn_res['torch_device']} "
              f"{fmt(knn_res['torch_seconds'], '.2f')} s; faiss (isc.knn) projected "
              f"{fmt(knn_res['faiss_seconds_projected'], '.1f')} s{' (' + knn_res['faiss_error'] + ')' if 'faiss_error' in knn_res else ''}")
    print(f"\n| GPUs | training hours ({'+'.join(st.name for st in stages)}) | extraction of 2M images, hours | "
          "kNN 50k x 1M (1 GPU), s | total hours |")
    print("|---|---|---|---|---|")
    # exact search costs nq x nb: a smaller measured size (smoke) is scaled up to 50k x 1M
    knn_scale = 50_000 * 1_000_000 / (knn_res["nq"] * knn_res["nb"]) if "nq" in knn_res else float("nan")
    for gpus in gpus_list:
        ext_h = 2_000_000 / (ext_rate * gpus) / 3600 if ext_rate == ext_rate and ext_rate > 0 else float("nan")
        knn_s = knn_res.get("torch_seconds", float("nan")) * knn_scale
        total = hours[gpus]["train"] + ext_h + knn_s / 3600
        print(f"| {gpus} | {fmt(hours[gpus]['train'], '.1f')} | {fmt(ext_h, '.2f')} | {fmt(knn_s, '.1f')} | "
              f"{fmt(total, '.1f')} |")
    print("\nassumes: G GPUs each run the measured per-GPU step in parallel (all-reduce and embedding all-gather "
          "not measured on one device), each with the CPU cores this box gave its loader; epochs as the seed "
          "ran them (1a 5, 1b 5 more, 2 7, 3 3, 4 10 on 4,991 pairs); 1M training images; a step takes the slower "
          "of loader and compute; extraction divides 2M images over the GPUs.")


def main(argv: list[str] | None = None) -> int:  # long: parse, build the data, measure, print, one flow
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (what the test runs)")
    p.add_argument("--stages", default="1a,1b,2,3,4", help="comma-separated stages to measure")
    p.add_argument("--gpus", default="", help="GPU counts to project (default 1,4,8; smoke 1,4)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per measurement (default 6; smoke 2)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 12; smoke 1)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: extract,knn")
    p.add_argument("--json", default="", help="also write every figure to this JSON file")
    p.add_argument("--forbid-imports", default="", help="comma-separated packages that must not be imported")
    args = p.parse_args(argv)
    if args.forbid_imports:
        from bench.gpu_check import forbid_imports

        forbid_imports([n for n in args.forbid_imports.split(",") if n])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import torch.distributed as dist

    if not args.smoke and not torch.cuda.is_available():
        print("recipe_bill: no CUDA device visible (use --smoke for the CPU toy run)")
        return 1
    sz = dict(SMOKE if args.smoke else REAL)
    if args.steps:
        sz["steps"] = args.steps
    if args.workers:
        sz["workers"] = args.workers
    gpus_list = tuple(int(g) for g in args.gpus.split(",") if g) or sz["gpus"]
    wanted = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(wanted) - {s.name for s in REAL_STAGES})
    if unknown:
        print(f"recipe_bill: unknown stage(s) {unknown}; choose from {[s.name for s in REAL_STAGES]}")
        return 2
    stages = [s for s in REAL_STAGES if s.name in wanted]
    device = torch.device("cpu" if args.smoke else "cuda:0")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"recipe_bill on {name}: torch {torch.__version__}, {os.cpu_count()} CPUs, backbone {sz['backbone']}, "
          f"{sz['workers']} loader workers, {sz['steps']} timed steps", flush=True)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)  # the loop's DDP + SyncBatchNorm path, no port opened
    cells: dict[tuple[str, int], Cell] = {}
    measured: dict[tuple[str, int, int], Cell] = {}
    extraction: dict = {}
    knn_res: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="recipe-bill-") as tmp:
            root = Path(tmp) / "disc21"
            t0 = time.perf_counter()
            pairs = make_disc21(root, sz["images"])
            print(f"synthetic DISC21: {sz['images']} training + reference JPEGs in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            for st in stages:
                for gpus in gpus_list:
                    items, negatives = per_gpu(st, gpus, sz["items_div"])
                    # 1b's step is 1a's (same size, batch, views): measured once
                    key = (st.config if st.name not in ("1a", "1b") else "stage1", items, negatives)
                    if key not in measured:
                        measured[key] = measure_stage(st, items, negatives, root, pairs, sz, device)
                        c = measured[key]
                        figures = c.error or f"{c.step:.1f} images/s, peak {fmt(c.peak_gib, '.1f')} GiB"
                        print(f"stage {st.name} x{gpus}: {c.images} images/GPU/step at {c.px} px: {figures}",
                              flush=True)
                    base = measured[key]
                    cells[(st.name, gpus)] = Cell(**{**base.__dict__, "stage": st.name})
            skip = set(args.skip.split(","))
            if "extract" not in skip:
                try:
                    extraction = measure_extraction(sz, device, Path(tmp))
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    extraction = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
            if "knn" not in skip:
                try:
                    knn_res = measure_knn(sz, device)
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    knn_res = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    finally:
        dist.destroy_process_group()
    hours = project(stages, cells, gpus_list, sz)
    print_report(stages, cells, hours, extraction, knn_res, gpus_list, args.smoke, name)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": name, "smoke": args.smoke, "sizes": sz,
            "cells": [{**c.__dict__, "gpus": g} for (_, g), c in cells.items()],
            "hours": {str(g): h for g, h in hours.items()}, "extraction": extraction, "knn": knn_res},
            indent=1, default=str))
    failed = [k for k, c in cells.items() if c.error and c.error != "OOM"]
    return 1 if failed or "error" in extraction or "error" in knn_res else 0


if __name__ == "__main__":
    sys.exit(main())
