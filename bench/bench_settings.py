"""What the val grid of extraction settings costs, as ratios to one plain extraction at the training size.

Times, in one run on the same images (interleaved rounds, the median kept, so a shared machine's load
drifts less into the ratios):

(a) ``isc extract``'s path at the training size, no TTA (what every candidate costs before the grid);
(b) the grid's work (:func:`isc.settings.score_grid` without the scoring): one decode per image, then every
    size without TTA, and TTA at each size (the grid tries TTA at the best plain size only: ``tta_sizes`` 1);
(c) ``isc extract``'s path at each setting (what re-extracting a candidate at its chosen setting costs).

Then projects the main job's added cost from the image counts of the data: the grid reads the val queries
+ every reference for each of the ``--top`` candidates; a candidate whose setting changed re-extracts
queries + references + training images; the search step reads queries + references at the champion's
setting. Printed for the worst case (every top candidate chooses the largest size + TTA) and for the
largest size without TTA, in units of (a) per image, and in seconds with (a)'s time here.

    python bench/bench_settings.py --model <checkpoint or run id> --data data/mini --images 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/mini")
    p.add_argument("--images", type=int, default=32, help="reference images timed")
    p.add_argument("--sizes", default="0,160,224")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is kept")
    p.add_argument("--top", type=int, default=2, help="candidates the main job runs the grid for")
    args = p.parse_args()

    import torch

    from isc.data.disc21 import DISC21
    from isc.extract.describe import describe_images, tta_load_size
    from isc.io import read_ground_truth
    from isc.models import load_model
    from isc.settings import _DecodedImages, parse_sizes

    torch.manual_seed(0)
    model = load_model(args.model)
    train = int(model.model_config["input_size"])
    data = DISC21(args.data)
    paths = [p for _, p in data.images("reference")[: args.images]]
    n = len(paths)
    sizes = parse_sizes(args.sizes, train)
    describe_images(model, paths[:8], input_size=train, batch_size=32)  # warm-up

    tasks = {"extract plain train": lambda: describe_images(model, paths, input_size=train, batch_size=32),
             "grid decode": lambda: _DecodedImages(paths, tta_load_size(max(sizes)))}
    decoded = _DecodedImages(paths, tta_load_size(max(sizes)))
    for s in sizes:
        for tta in (False, True):
            tasks[f"grid {s}{' tta' if tta else ''}"] = (
                lambda s=s, tta=tta: decoded.describe(model, s, tta, batch_size=32))
            tasks[f"extract {s}{' tta' if tta else ''}"] = (
                lambda s=s, tta=tta: describe_images(model, paths, input_size=s, tta=tta, batch_size=32))
    times: dict[str, list[float]] = {k: [] for k in tasks}
    for _ in range(args.rounds):
        for name, fn in tasks.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / n)
    per = {k: statistics.median(v) for k, v in times.items()}
    base = per["extract plain train"]
    print(f"{n} images x {args.rounds} rounds, {torch.get_num_threads()} threads; training size {train} px: "
          f"extract plain {base * 1000:.1f} ms/image (= 1 unit)")
    print(f"grid decode (once per image, all sizes): x{per['grid decode'] / base:.2f}")
    print("size   grid plain  grid TTA   extract plain  extract TTA")
    for s in sizes:
        print(f"{s:4d}   x{per[f'grid {s}'] / base:6.2f}   x{per[f'grid {s} tta'] / base:6.2f}   "
              f"x{per[f'extract {s}'] / base:6.2f}        x{per[f'extract {s} tta'] / base:6.2f}")

    # projection onto a main job over this data
    counts = {"q": len(data.images("query")), "r": len(data.images("reference")), "t": len(data.images("train"))}
    val = data.root / "ground_truth_val.csv"
    n_val = len(read_ground_truth(val).queries) if val.is_file() else counts["q"]
    grid_images = n_val + counts["r"]
    plain_sum = sum(per[f"grid {s}"] for s in sizes) + per["grid decode"]
    big = max(sizes)
    print(f"\nmain job projection: {args.top} candidates x {grid_images} grid images (val queries + references); "
          f"re-extraction {sum(counts.values())} images (q+r+t); search {counts['q'] + counts['r']} images")
    for label, final in ((f"{big} px + TTA chosen", f"{big} tta"), (f"{big} px chosen", f"{big}")):
        grid = args.top * grid_images * (plain_sum + per[f"grid {big} tta"])
        again = args.top * sum(counts.values()) * per[f"extract {final}"]
        search = (counts["q"] + counts["r"]) * (per[f"extract {final}"] - base)
        total = grid + again + search
        print(f"  {label:22s} grid {grid:6.0f} s, re-extraction {again:6.0f} s, search +{search:5.0f} s: "
              f"+{total:6.0f} s here = {total / base / (sum(counts.values())):.1f} plain training-size "
              f"extractions of the data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
