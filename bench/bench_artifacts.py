"""How much MLflow artifact storage does checkpoint retention save? Prints, measured in this one run:

the bytes of one training run's artifacts (``checkpoints/`` and everything) with the default retention (the
last checkpoint + the hand-off epochs) and with ``keep_checkpoints: all`` (every epoch, the behaviour before
retention), the two runs otherwise identical, and their ratio. The default shape is stage 2's: 7 epochs,
hand-off ``checkpoint_0005``.

CPU, the tests' tiny backbone by default (about a minute): ``python bench/bench_artifacts.py``;
the demo's Lite0 stage 2 (a few minutes): ``--config demo_stage2 --steps 1``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

TINY = dict(backbone="test_efficientnet", input_size=32, batch_size=4, memory_size=64, workers=0,
            log_every_steps=1, stage="demo", seed=3, lr=0.05, pretrained=False)


def artifact_bytes(run_id: str, path: str = "") -> dict[str, int]:
    """``{artifact path: bytes}`` of every file under ``path`` of the run (recursive listing)."""
    from mlflow import MlflowClient

    out: dict[str, int] = {}
    for info in MlflowClient().list_artifacts(run_id, path or None):
        if info.is_dir:
            out.update(artifact_bytes(run_id, info.path))
        else:
            out[info.path] = int(info.file_size or 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="", help="training config (default: the tests' tiny setup)")
    ap.add_argument("--data", default="", help="DISC21-shaped dataset (default: build a tiny mini one)")
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--keep-epochs", default="5", help="hand-off epochs kept by the default retention")
    ap.add_argument("--steps", type=int, default=2, help="steps per epoch")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_artifacts_"))
    os.environ["ISC_HOME"] = str(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    from isc.train import load_config, train

    data = args.data
    if not data:
        from isc.data.mini import make_mini

        data = str(make_mini(tmp / "mini", seed=0, size="tiny").root)
    base = {} if args.config else dict(TINY)
    base.update(data=data, epochs=args.epochs, max_steps_per_epoch=args.steps, keep_epochs=args.keep_epochs,
                experiment_name="bench-artifacts")
    measured = {}
    for name, extra in (("default", {}), ("all", {"keep_checkpoints": "all"})):
        cfg = load_config(args.config or None, **base, **extra, run_name=name, output_dir=str(tmp / "out" / name))
        result = train(cfg)
        files = artifact_bytes(result.run_id)
        ckpt = {k: v for k, v in files.items() if k.startswith("checkpoints/")}
        local = sum(p.stat().st_size for p in (tmp / "out" / name / "checkpoints").glob("*.pth.tar"))
        measured[name] = (sum(ckpt.values()), sum(files.values()), local)
        print(f"[{name:7s}] keep_checkpoints={cfg.keep_checkpoints} keep_epochs={cfg.keep_epochs}: "
              f"{len(ckpt)} checkpoint artifact(s) {sorted(Path(k).name[11:15] for k in ckpt)}, "
              f"checkpoints/ {sum(ckpt.values()):,} B, all artifacts {sum(files.values()):,} B, "
              f"local checkpoints {local:,} B")
    (c0, t0, l0), (c1, t1, l1) = measured["default"], measured["all"]
    print(f"ratio default / all: checkpoints/ {c0 / c1:.3f}, all artifacts {t0 / t1:.3f}, local {l0 / l1:.3f} "
          f"({args.epochs} epochs; per-checkpoint size {c1 / args.epochs:,.0f} B)")


if __name__ == "__main__":
    main()
