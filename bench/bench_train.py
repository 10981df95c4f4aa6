"""Where does a training step's time go? Prints, measured in this one run on this machine:

1. the XBM contrastive loss (forward + backward through the loss, full bank) as a share of a whole
   training step (model forward + loss + backward + SGD step) at the demo config's batch/resolution;
2. the same share as the real training loop's phase timers see it;
3. MLflow logging time (metrics every step, per-epoch checkpoint + summary uploads to a SQLite store) as
   a share of the training wall time, and the wall-time difference against a run that logs nothing per
   step and uploads no checkpoints.

CPU by default, about 1-2 minutes: ``python bench/bench_train.py``; larger: ``--steps 50 --input-size 96``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo_stage1", help="training config whose batch/model/bank are measured")
    ap.add_argument("--data", default="", help="DISC21-shaped dataset (default: build a tiny mini one)")
    ap.add_argument("--steps", type=int, default=8, help="training steps per timed run")
    ap.add_argument("--input-size", type=int, default=0, help="override the config's input size")
    ap.add_argument("--batch-size", type=int, default=0, help="override the config's global batch")
    ap.add_argument("--repeat", type=int, default=10, help="repetitions of the micro-benchmark")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    os.environ["ISC_HOME"] = str(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import torch

    from isc.losses import XBMContrastiveLoss
    from isc.models import create_model
    from isc.train import load_config, train

    overrides = {}
    if args.input_size:
        overrides["input_size"] = args.input_size
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg = load_config(args.config, **overrides)
    data = args.data
    if not data:
        from isc.data.mini import make_mini

        data = str(make_mini(tmp / "mini", seed=0, size="tiny").root)
    n_emb = cfg.global_batch(1) * cfg.images_per_item_at(1)  # one process, as this benchmark runs
    print(f"config {args.config}: {cfg.backbone} at {cfg.input_size}px, global batch {cfg.global_batch(1)} "
          f"({n_emb} embeddings/step), memory {cfg.memory_size}, torch threads {torch.get_num_threads()}")

    # 1. micro-benchmark: one step of the model vs the loss on a full bank
    torch.manual_seed(0)
    model = create_model(cfg.backbone, input_size=cfg.input_size, dim=cfg.dim).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    crit = XBMContrastiveLoss(cfg.pos_margin, cfg.neg_margin, cfg.dim, cfg.memory_size)
    x = torch.randn(n_emb, 3, cfg.input_size, cfg.input_size)
    labels = torch.arange(n_emb) // cfg.images_per_item_at(1)
    with torch.no_grad():
        for _ in range(cfg.memory_size // n_emb + 1):  # fill the bank
            crit(torch.nn.functional.normalize(torch.randn(n_emb, cfg.dim), dim=1), labels + 10_000)
    emb_leaf = torch.nn.functional.normalize(torch.randn(n_emb, cfg.dim), dim=1).requires_grad_(True)

    def loss_step():
        crit(emb_leaf, labels).backward()

    def full_step():
        opt.zero_grad()
        crit(model(x), labels).backward()
        opt.step()

    t_loss = _timeit(loss_step, args.repeat)
    t_step = _timeit(full_step, args.repeat)
    print(f"[micro] XBM loss fwd+bwd (bank {crit.memory_fill}/{cfg.memory_size}): {t_loss * 1e3:.1f} ms; "
          f"full step: {t_step * 1e3:.1f} ms; loss share of a step = {t_loss / t_step:.3f}")

    # 2./3. the real loop, with and without per-step logging / checkpoint uploads
    base = dict(data=data, epochs=2, max_steps_per_epoch=max(1, args.steps // 2), workers=0,
                experiment_name="bench-train", **overrides)
    results = {}
    # warm-up run: pays the one-off costs (store creation, imports, first-call kernels) for both timed runs
    train(load_config(args.config, **{**base, "epochs": 1, "max_steps_per_epoch": 1}))
    for name, extra in (("logged", dict(log_every_steps=1, log_checkpoints=True)),
                        ("quiet", dict(log_every_steps=10**9, log_checkpoints=False))):
        run_cfg = load_config(args.config, **{**base, **extra})
        t0 = time.perf_counter()
        res = train(run_cfg)
        wall = time.perf_counter() - t0
        results[name] = (wall, res.metrics)
    wall, m = results["logged"]
    compute = m.get("time_forward_s", 0) + m.get("time_loss_s", 0) + m.get("time_backward_s", 0)
    print(f"[loop] phases: forward {m['time_forward_s']:.2f} s, loss {m['time_loss_s']:.2f} s (forward only), "
          f"backward+step {m['time_backward_s']:.2f} s -> loss-forward share of compute = "
          f"{m['time_loss_s'] / compute:.3f}")
    print(f"[loop] MLflow logging (every step + checkpoint/summary uploads): {m.get('time_mlflow_s', 0):.2f} s of "
          f"{wall:.1f} s wall = {m.get('time_mlflow_s', 0) / wall:.3f} share")
    q_wall, q = results["quiet"]
    print(f"[loop] quiet run (params + epoch metrics only): mlflow {q.get('time_mlflow_s', 0):.2f} s of {q_wall:.1f} s "
          f"wall = {q.get('time_mlflow_s', 0) / q_wall:.3f}; logged/quiet wall ratio = {wall / q_wall:.3f} "
          f"(after a warm-up run; per-run start-up included in both)")


if __name__ == "__main__":
    main()
