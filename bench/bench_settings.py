"""What the val grid of extraction settings costs, as ratios to today's one extraction at the training size.

Times, in one run on the same images, (a) the plain extraction at the training size (what every candidate
cost before the grid), (b) the grid's work per size (one load at the TTA load size, the plain and the TTA
descriptor from it: :func:`isc.settings._describe_grid_size`) and (c) an extraction at each setting, and
prints per-image seconds and ratios. Multiply by the images of a main job (the grid: val queries +
references per candidate; the chosen setting's extraction: queries + references + training images) to
project its cost.

    python bench/bench_settings.py --model <checkpoint or run id> --data data/mini --images 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/mini")
    p.add_argument("--images", type=int, default=64, help="reference images timed")
    p.add_argument("--sizes", default="0,160,224")
    args = p.parse_args()

    import torch

    from isc.data.disc21 import DISC21
    from isc.extract import describe_images
    from isc.models import load_model
    from isc.settings import _describe_grid_size, parse_sizes

    torch.manual_seed(0)
    model = load_model(args.model)
    train = int(model.model_config["input_size"])
    paths = [p for _, p in DISC21(args.data).images("reference")[: args.images]]
    n = len(paths)
    describe_images(model, paths[:8], input_size=train, batch_size=32)  # warm-up

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) / n

    base = timed(lambda: describe_images(model, paths, input_size=train, batch_size=32))
    print(f"{n} images, {torch.get_num_threads()} threads; training size {train} px plain: {base * 1000:.1f} ms/image")
    grid_total = 0.0
    print("size  grid (plain+TTA from one load)  extract plain  extract TTA   (ratios to the training-size plain)")
    for size in parse_sizes(args.sizes, train):
        g = timed(lambda s=size: _describe_grid_size(model, paths, s, [False, True], 32, 0))
        e = timed(lambda s=size: describe_images(model, paths, input_size=s, batch_size=32))
        t = timed(lambda s=size: describe_images(model, paths, input_size=s, batch_size=32, tta=True))
        grid_total += g
        print(f"{size:4d}  {g * 1000:8.1f} ms  x{g / base:5.1f}     {e * 1000:7.1f} ms x{e / base:4.1f}  "
              f"{t * 1000:7.1f} ms x{t / base:5.1f}")
    print(f"whole grid: x{grid_total / base:.1f} the training-size extraction per image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
