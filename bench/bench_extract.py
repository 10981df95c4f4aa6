"""Extraction benchmark: where the time goes, pipeline throughput vs. the bare forward pass, memory.

Measured in one run of this script, on real photos (:func:`make_photos`: crops of scikit-image's bundled
photographs, ~1000 px long side, JPEG quality 80-95; ``--synthetic`` for the old smooth 256 px images):

1. **stage shares**: per image, in the main process one stage at a time, the cost of each stage the
   pipeline runs -- decode (CPU: Pillow, JPEG draft mode as extraction does; CUDA: nvJPEG batched on the
   GPU), resize + normalise, host->device copy, forward (AMP on CUDA), h5 write -- and each one's share
   of their sum. The full-size CPU decode is printed next to it: what draft mode saves.
2. **throughput ratio** = images/s of :func:`isc.extract.streamed.extract_descriptors` (decode in DataLoader
   workers or on the GPU, resize, copy, forward, L2 normalisation, streamed h5 append, worker start-up)
   divided by images/s of the bare forward pass of the same network and batch size on tensors decoded
   beforehand. Goal >= 0.9 (GPU), >= 0.85 (2 CPU cores, where the decoders compete with the forward
   for the same cores). Also the same pipeline with draft decoding off (``isc.extract.decode.DRAFT_GAP = 0``,
   the decoder before issue 21), so the gain is measured in the same run.
3. **memory flatness** = peak RSS of an extraction of 4N images / peak RSS of N images, each in a fresh
   subprocess (RSS of the main process sampled with psutil every 20 ms, plus its DataLoader workers).
   Goal ~1.0: descriptors are appended to h5 batch by batch, nothing grows with N.

Random-init weights (no download). Default run: a few minutes on 2 CPU cores.

    .venv/bin/python bench/bench_extract.py                      # defaults (CPU figures of the docs)
    python bench/bench_extract.py --backbone tf_efficientnetv2_m.in21k_ft_in1k --input-size 512 \
        --batch-size 128 --workers 12 --n-images 2048 --skip-memory   # GPU box (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, side: int = 256, seed: int = 0) -> None:
    """``n`` smooth random JPEGs named R000000.jpg ... (cheap to make, realistic to decode)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.BICUBIC)
        img.save(folder / f"R{i:06d}.jpg", quality=90)


# scikit-image's bundled photographs (no download): colour and grayscale, faces, animals, objects, texture.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "motorcycle_left.png",
          "retina.jpg", "rocket.jpg", "ihc.png", "camera.png", "moon.png", "coins.png", "brick.png")  # fmt: skip


def make_photos(folder: Path, n: int, long_side: int = 1000, seed: int = 0, prefix: str = "R") -> None:
    """``n`` JPEGs cut from real photos: a random crop (60-100 % of each side), a random flip, rescaled
    so the long side is ``long_side`` x U(0.8, 1.2), saved at quality 80-95 -- sizes and JPEG settings of
    web photos, where decoding and resizing cost what they cost on DISC21 (smooth synthetic images
    decode faster)."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    src = Path(next(iter(spec.submodule_search_locations))) / "data" if spec else Path("/nonexistent")
    imgs = [Image.open(src / p).convert("RGB") for p in PHOTOS if (src / p).is_file()]
    if not imgs:
        raise RuntimeError(f"no scikit-image photos found in {src}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = imgs[i % len(imgs)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        scale = long_side * rng.uniform(0.8, 1.2) / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))), Image.BICUBIC)
        crop.save(folder / f"{prefix}{i:06d}.jpg", quality=int(rng.integers(80, 96)))


def make_dataset(folder: Path, n: int, synthetic: bool = False, distinct: int = 256) -> None:
    """``n`` images in ``folder``: at most ``distinct`` different photos, then byte copies of them (a
    copy costs the same to decode; making 2048 distinct photos would take minutes of CPU)."""
    import shutil

    if synthetic:
        make_images(folder, n)
        return
    make_photos(folder, min(n, distinct))
    for i in range(distinct, n):
        shutil.copyfile(folder / f"R{i % distinct:06d}.jpg", folder / f"R{i:06d}.jpg")


def build_model(args: argparse.Namespace):
    import torch

    from isc.models import create_model

    torch.manual_seed(0)
    return create_model(args.backbone, pretrained=False, input_size=args.input_size).eval()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


_DECODED: dict = {}


def bare_forward_rate(model, data, args, device) -> float:
    """Images/s of model(x) alone on pre-decoded, pre-normalised tensors already on ``device``."""
    import torch

    from isc.extract.decode import eval_transform_for

    key = (id(model), str(device))
    if key not in _DECODED:  # decoded once: the bare passes around each pipeline run reuse the tensors
        transform = eval_transform_for(model, args.input_size)
        paths = [p for _, p in data.images("reference")][: args.n_images]
        load = transform.loader()
        x = torch.stack([transform(load(p)) for p in paths]).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        _DECODED.clear()
        _DECODED[key] = x
    x = _DECODED[key]
    paths = range(len(x))
    batches = list(torch.split(x, args.batch_size))
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"),
    ):
        model(batches[0])  # warm-up (cudnn autotune, allocator)
        _sync(device)
        t0 = time.perf_counter()
        for b in batches:
            out = model(b)
        out.float().cpu()  # the pipeline also brings descriptors back to the host
        _sync(device)
        return len(paths) / (time.perf_counter() - t0)


def stage_costs(model, data, args, device) -> dict[str, float]:
    """Seconds per image of each pipeline stage, run one after the other in this process (see the module
    docstring), on ``--stage-images`` images. ``decode_full``: the CPU decode without draft mode."""
    # long: one stage after the other on the same images, each timed around exactly the code extraction runs
    import h5py
    import torch

    from isc.data.images import load_image
    from isc.extract.decode import decode_jpegs_on, eval_transform_for, jpeg_decode_device
    from isc.extract.describe import describe_tensors
    from isc.extract.streamed import H5Appender

    transform = eval_transform_for(model, args.input_size)
    paths = [p for _, p in data.images("reference")][: args.stage_images]
    n = len(paths)
    cost: dict[str, float] = {}
    # Decode and resize run in DataLoader workers, which torch limits to one thread each; timed with more
    # threads here, ToTensor/Normalize spin on a loaded machine (54 ms instead of 3 ms per image, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    full = [load_image(p) for p in paths]
    cost["decode_full"] = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for img in full:
        transform(img)
    cost["resize_full"] = (time.perf_counter() - t0) / n
    del full
    on_device = jpeg_decode_device(device, transform)
    if on_device is None:
        load = transform.loader()
        t0 = time.perf_counter()
        images = [load(p) for p in paths]
        cost["decode"] = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        x = torch.stack([transform(img) for img in images])
        cost["resize"] = (time.perf_counter() - t0) / n
        if device.type == "cuda":
            x = x.pin_memory()
        t0 = time.perf_counter()
        batches = [b.to(device, non_blocking=True) for b in torch.split(x, args.batch_size)]
        _sync(device)
        cost["host_to_device"] = (time.perf_counter() - t0) / n if device.type == "cuda" else 0.0
    else:
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
        t0 = time.perf_counter()
        on = [r.pin_memory().to(device, non_blocking=True) for r in raw]  # the JPEG bytes nvJPEG copies over
        _sync(device)
        cost["host_to_device"] = (time.perf_counter() - t0) / n  # (inside decode_jpeg in the pipeline)
        chunks = [raw[i : i + args.batch_size] for i in range(0, n, args.batch_size)]
        decode_jpeg(chunks[0], mode=ImageReadMode.RGB, device=device)  # warm-up (nvJPEG handles)
        _sync(device)
        t0 = time.perf_counter()
        for c in chunks:
            decode_jpeg(c, mode=ImageReadMode.RGB, device=device)
        _sync(device)
        cost["decode"] = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        batches = [torch.stack(decode_jpegs_on(device, c, transform)) for c in chunks]
        _sync(device)
        cost["resize"] = max(0.0, (time.perf_counter() - t0) / n - cost["decode"])
        del on
    torch.set_num_threads(threads)
    describe_tensors(model, batches[0])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    rows = [describe_tensors(model, b) for b in batches]
    cost["forward"] = (time.perf_counter() - t0) / n
    with tempfile.TemporaryDirectory() as tmp, h5py.File(Path(tmp) / "w.h5", "w") as f:
        writer = H5Appender(f, "reference", rows[0].shape[1], 7)
        t0 = time.perf_counter()
        for r in rows:
            writer.append(r, [f"R{i:06d}" for i in range(writer.n, writer.n + len(r))])
        f.flush()
        cost["write"] = (time.perf_counter() - t0) / n
    return cost


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import isc.extract.decode
    from isc.data.disc21 import DISC21
    from isc.extract.describe import resolve_device
    from isc.extract.streamed import extract_descriptors

    device = resolve_device(args.device or None)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp) / "data" / "reference_images", args.n_images, args.synthetic)
        data = DISC21(Path(tmp) / "data")
        model = build_model(args).to(device)
        if device.type == "cuda":
            model.to(memory_format=torch.channels_last)
        costs = stage_costs(model, data, args, device)

        # Warm-up run of the pipeline itself on one batch (first-call costs), then the measured runs.
        def run(out: str, limit: int | None = None) -> float:
            t0 = time.perf_counter()
            res = extract_descriptors(model, data, "r", Path(tmp) / out, batch_size=args.batch_size,
                                      workers=args.workers, device=device, limit=limit, overwrite=True)  # fmt: skip
            return res["counts"]["reference"] / (time.perf_counter() - t0)

        def run_no_draft() -> float:
            gap, isc.extract.decode.DRAFT_GAP = isc.extract.decode.DRAFT_GAP, 0.0  # workers fork: they see it too
            try:
                return run("out_no_draft")
            finally:
                isc.extract.decode.DRAFT_GAP = gap

        run("warm", limit=args.batch_size)
        # On a shared machine the load drifts: bare, pipeline, [pipeline without draft,] bare, ... and each
        # pipeline rate is divided by the mean of the bare passes around it.
        bares = [bare_forward_rate(model, data, args, device)]
        rates, no_draft = [], []
        for _ in range(args.repeats):
            rates.append(run("out"))
            if not args.skip_no_draft:
                no_draft.append(run_no_draft())
            bares.append(bare_forward_rate(model, data, args, device))
    around = [(a + b) / 2 for a, b in zip(bares, bares[1:], strict=False)]
    return {
        "bares": bares,
        "bare_images_per_s": float(np.mean(bares)),
        "extract_images_per_s": float(np.mean(rates)),
        "ratios": [r / b for r, b in zip(rates, around, strict=True)],
        "no_draft_ratios": [r / b for r, b in zip(no_draft, around, strict=False)],
        "no_draft_images_per_s": float(np.mean(no_draft)) if no_draft else None,
        "costs": costs,
        "device": str(device),
    }


def print_stages(costs: dict[str, float], device: str) -> None:
    stages = ["decode", "resize", "host_to_device", "forward", "write"]
    total = sum(costs[s] for s in stages)
    parts = ", ".join(f"{s} {costs[s] * 1e3:.2f} ms ({costs[s] / total:.0%})" for s in stages)
    print(f"[{device}] stages per image (one at a time, main process): {parts}; sum {total * 1e3:.2f} ms")
    print(f"[{device}] without draft decoding (full-size decode, then resize): decode "
          f"{costs['decode_full'] * 1e3:.2f} ms + resize {costs['resize_full'] * 1e3:.2f} ms per image; "
          f"with it (above): {costs['decode'] * 1e3:.2f} + {costs['resize'] * 1e3:.2f} ms")  # fmt: skip


def child_peak_rss(args: argparse.Namespace) -> None:
    """Run one extraction of ``--n`` images and print JSON {peak_rss_mb, baseline_rss_mb}."""
    import psutil

    from isc.data.disc21 import DISC21
    from isc.extract.streamed import extract_descriptors

    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp) / "data" / "reference_images", args.n, args.synthetic)
        data = DISC21(Path(tmp) / "data")
        model = build_model(args)
        baseline = proc.memory_info().rss
        peak = {"main": baseline, "total": baseline}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                main = proc.memory_info().rss
                workers = 0
                for c in proc.children(recursive=True):
                    try:
                        workers += c.memory_info().rss
                    except psutil.Error:
                        pass
                peak["main"] = max(peak["main"], main)
                peak["total"] = max(peak["total"], main + workers)
                time.sleep(0.02)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        extract_descriptors(
            model,
            data,
            "r",
            Path(tmp) / "out",
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device or None,
        )
        stop.set()
        th.join()
    mb = 1024 * 1024
    print(
        json.dumps(
            {
                "n": args.n,
                "baseline_rss_mb": baseline / mb,
                "peak_rss_mb": peak["main"] / mb,
                "peak_rss_with_workers_mb": peak["total"] / mb,
            }
        )
    )


def memory(args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for n in (args.mem_images, 4 * args.mem_images):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--n",
            str(n),
            "--backbone",
            args.backbone,
            "--input-size",
            str(args.input_size),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--device",
            args.device,
        ] + (["--synthetic"] if args.synthetic else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_b0", help="timm model name (random init)")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (the CLI default)")
    p.add_argument("--n-images", type=int, default=128, help="images for the throughput comparison")
    p.add_argument("--mem-images", type=int, default=64, help="N for the memory runs (N and 4N)")
    p.add_argument("--device", default="", help="cuda/cpu; empty = CUDA when available")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-no-draft", action="store_true", help="skip the pipeline run without draft decoding")
    p.add_argument("--stage-images", type=int, default=64, help="images for the per-stage costs")
    p.add_argument("--repeats", type=int, default=2, help="pipeline runs, each between two bare passes")
    p.add_argument("--synthetic", action="store_true", help="smooth synthetic 256 px JPEGs, not photos")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_peak_rss(args)
        return

    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, backbone {args.backbone}, "
        f"{args.input_size}px, batch {args.batch_size}, {args.workers} workers, "
        f"{'synthetic 256 px JPEGs' if args.synthetic else 'photos ~1000 px'}"
    )
    t = throughput(args)
    print_stages(t["costs"], t["device"])
    dev = t["device"]
    bares = ", ".join(f"{b:.1f}" for b in t["bares"])
    print(f"[{dev}] bare forward: {t['bare_images_per_s']:.1f} images/s (passes: {bares}); extract pipeline: "
          f"{t['extract_images_per_s']:.1f} images/s; ratio {np.mean(t['ratios']):.3f} (per repeat: "
          f"{', '.join(f'{r:.3f}' for r in t['ratios'])}; goal >= 0.9, 2 CPU cores >= 0.85)")  # fmt: skip
    if t["no_draft_images_per_s"]:
        print(f"[{dev}] same pipeline without draft decoding: {t['no_draft_images_per_s']:.1f} images/s; ratio "
              f"{np.mean(t['no_draft_ratios']):.3f} (per repeat: {', '.join(f'{r:.3f}' for r in t['no_draft_ratios'])})")  # fmt: skip
    if args.skip_memory:
        return
    rows = memory(args)
    for r in rows:
        print(
            f"n={r['n']:>6}: peak RSS main {r['peak_rss_mb']:.1f} MB (baseline after model load "
            f"{r['baseline_rss_mb']:.1f} MB), with workers {r['peak_rss_with_workers_mb']:.1f} MB"
        )
    a, b = rows
    print(
        f"memory ratio 4N/N: main {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}, "
        f"growth above baseline {b['peak_rss_mb'] - b['baseline_rss_mb']:.1f} MB vs "
        f"{a['peak_rss_mb'] - a['baseline_rss_mb']:.1f} MB (goal: flat)"
    )


if __name__ == "__main__":
    main()
