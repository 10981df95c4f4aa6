"""Evaluation figures: the precision-recall curve and a gallery of top matches.

Both write PNGs atomically with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isc.data.disc21 import list_images
from isc.data.images import load_image
from isc.errors import BadImageError
from isc.fileutil import atomic_path
from isc.metrics import EvalResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pr_curve_png(
    result: EvalResult | Sequence[tuple[str, EvalResult]], path: str | Path, title: str = "ISC21 evaluation"
) -> Path:
    """Precision (y) against recall (x) over the global ranking, P90 operating point marked.

    ``result`` is one :class:`EvalResult` or a list of ``(label, result)`` drawn on the same axes
    (e.g. before/after post-processing).
    """
    plt = _pyplot()
    curves = [("descriptors", result)] if isinstance(result, EvalResult) else list(result)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    try:
        for label, res in curves:
            rk, m = res.ranked, res.metrics
            # start at recall 0 with the first precision so the curve touches the y axis
            rec = np.concatenate([[0.0], rk.recall]) if len(rk) else np.array([0.0])
            prec = np.concatenate([[rk.precision[0]], rk.precision]) if len(rk) else np.array([0.0])
            line = ax.plot(rec, prec, lw=1.5, label=f"{label}: µAP {m.average_precision:.4f}")[0]
            if m.threshold_p90 is not None:
                ax.plot(
                    [m.recall_p90],
                    [0.9],
                    "o",
                    color=line.get_color(),
                    label=f"{label}: R@P90 {m.recall_p90:.4f} (score {m.threshold_p90:.4g})",
                )
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(title)
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _thumb(path: Path | None, size: int = 160) -> np.ndarray:
    """An RGB uint8 [size, size, 3] thumbnail (grey placeholder when the image is missing/unreadable)."""
    if path is None:
        return np.full((size, size, 3), 200, dtype=np.uint8)
    try:
        img = load_image(path)
    except BadImageError:
        return np.full((size, size, 3), 200, dtype=np.uint8)
    img.thumbnail((size, size))
    out = np.full((size, size, 3), 255, dtype=np.uint8)
    arr = np.asarray(img)
    y0, x0 = (size - arr.shape[0]) // 2, (size - arr.shape[1]) // 2
    out[y0 : y0 + arr.shape[0], x0 : x0 + arr.shape[1]] = arr
    return out


def gallery_png(
    result: EvalResult,
    query_dir: str | Path,
    reference_dir: str | Path,
    path: str | Path,
    n: int = 12,
) -> Path:
    """The ``n`` best-scored predictions as rows: query | matched reference | score.

    The reference thumbnail gets a green frame for a true match and a red one for a false match.
    Image files are found by id in the DISC21 folders (missing files show as grey squares).
    """
    plt = _pyplot()
    queries = dict(list_images(query_dir))
    refs = dict(list_images(reference_dir))
    rk = result.ranked
    rows = max(1, min(n, len(rk)))
    fig, axes = plt.subplots(rows, 2, figsize=(4.4, 2.2 * rows), dpi=80, squeeze=False)
    try:
        for i in range(rows):
            axq, axr = axes[i]
            for ax in (axq, axr):
                ax.set_xticks([])
                ax.set_yticks([])
            if i >= len(rk):
                axq.set_title("no predictions", fontsize=8)
                continue
            qid, rid, score, ok = rk.query_ids[i], rk.reference_ids[i], rk.scores[i], bool(rk.labels[i])
            axq.imshow(_thumb(queries.get(qid)))
            axq.set_title(f"#{i + 1} {qid}", fontsize=8)
            axr.imshow(_thumb(refs.get(rid)))
            axr.set_title(f"{rid}  {float(score) + 0.0:.4g}", fontsize=8)  # + 0.0: no "-0"
            color = "tab:green" if ok else "tab:red"
            for spine in axr.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(4)
        fig.suptitle("top matches (green = true copy, red = false)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / rows))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return Path(path)
