"""Can one CPU core of data loading keep up with the model? Training-view throughput vs. model step rate.

Measures, in one run:

* loader: source images/s on ONE core (decode with ``load_image`` + the stage's NCropsTransform:
  1 moderate + ``ncrops - 1`` hard views) for each ``--stages`` entry at ``--size`` px;
* model: images/s of a timm model forward+backward+SGD step at the same size (``--model``,
  ``pretrained=False``), with ``--batch-size`` images per step, on ``--device`` (cpu: all torch threads);

and prints both and the ratio ``model / loader``, i.e. how many loader cores (DataLoader workers) one
model replica needs so that it never waits for data.

    .venv/bin/python bench/bench_dataloader.py                       # ~1 min on CPU
    .venv/bin/python bench/bench_dataloader.py --device cuda --model tf_efficientnetv2_m --batch-size 64
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from isc.data.augment import build_train_transform  # noqa: E402
from isc.data.images import load_image  # noqa: E402
from isc.data.mini import make_mini  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def loader_rate(paths: list[Path], stage: str, size: int, ncrops: int, n: int) -> float:
    """Source images per second on one core (decode + all ``ncrops`` views)."""
    t = build_train_transform(stage, size, ncrops, MEAN, STD, overlay_paths=paths)
    random.seed(0)
    torch.manual_seed(0)
    for p in paths[:5]:  # warm-up (font/emoji caches)
        t(load_image(p))
    start = time.perf_counter()
    for i in range(n):
        views = t(load_image(paths[i % len(paths)]))
        assert len(views) == ncrops
    return n / (time.perf_counter() - start)


def model_rate(model_name: str, size: int, batch: int, steps: int, device: str) -> float:
    """Images per second of forward + backward + SGD step (AMP on CUDA)."""
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=256).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    use_amp = device.startswith("cuda")

    def step() -> None:
        with torch.autocast(device_type="cuda", enabled=use_amp):
            loss = model(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if use_amp:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if use_amp:
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data", default="", help="DISC21-layout folder (default: build a mini dataset in a temp dir)"
    )
    ap.add_argument("--stages", default="smoke,stage1", help="comma-separated augmentation stages")
    ap.add_argument("--size", type=int, default=256, help="input size in px")
    ap.add_argument("--ncrops", type=int, default=2, help="views per image (1 moderate + ncrops-1 hard)")
    ap.add_argument("--images", type=int, default=100, help="source images timed per stage")
    ap.add_argument("--model", default="resnet18", help="timm model name")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="timed model steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    n_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            root = Path(args.data)
        else:
            print("building the default mini dataset (256 px) ...", flush=True)
            root = make_mini(Path(tmp) / "mini", seed=0, size="default").root
        paths = sorted((root / "training_images").glob("*.jpg"))
        torch.set_num_threads(1)
        rates = {
            s: loader_rate(paths, s, args.size, args.ncrops, args.images) for s in args.stages.split(",")
        }
    torch.set_num_threads(n_threads)
    threads = n_threads
    m = model_rate(args.model, args.size, args.batch_size, args.steps, args.device)

    print(f"\ninput {args.size} px, ncrops {args.ncrops}; model {args.model} batch {args.batch_size} on {args.device}"
          + (f" ({threads} torch threads)" if args.device == "cpu" else ""))  # fmt: skip
    print(
        f"{'stage':<8} {'loader img/s/core':>18} {'views/s/core':>13} {'model img/s':>12} {'cores needed':>13}"
    )
    for stage, r in rates.items():
        print(f"{stage:<8} {r:>18.1f} {r * args.ncrops:>13.1f} {m:>12.1f} {m / r:>13.2f}")


if __name__ == "__main__":
    main()
