"""Extraction settings (input size, test-time augmentation) as part of the evaluated model.

Why: the same weights give very different µAP at different extraction settings (on photos of several hundred
pixels a model trained at 128 px scored 0.61 at 128 px and 0.72 at 224 px + TTA), so the size a model was
trained at is not the size it should serve at. Each candidate's settings are chosen on the val split from a
small grid (:func:`score_grid`, :func:`choose`), recorded on its evaluation run (``isc.input_size``,
``isc.tta`` tags, ``extract.*`` params) and on the registered version (the pyfunc's ``model_config`` and the
version's tags), and every consumer of a registered model -- ``isc extract --model models:/...``, the pyfunc
(``mlflow models serve``), ``isc search``, the exports -- uses them unless explicit flags say otherwise
(:func:`resolve`).

Cost (successive halving, :func:`score_grid`): every val image is decoded once and kept in memory; every
size is scored without TTA, then TTA only at the best size(s) of that round (``tta_sizes``). TTA is 6
passes at up to 2x the pixels, so TTA at every size was most of the grid's cost. The main job
(:mod:`isc.driver`) runs the grid only for the ``top`` candidates by val µAP at their training size. Each
scored descriptor is the one ``isc extract`` makes at that setting (same transform and passes). The grid
scores val queries against every reference before negative embedding subtraction (NES needs the training
images at every setting); the chosen setting is then extracted by the ordinary ``extract`` step and scored
after NES like every other row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isc.contract import Tag, parse_bool
from isc.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SIZES = "0,160,224"  # 0 = the model's training size
DEFAULT_TTA = "false,true"
DEFAULT_TTA_SIZES = 1  # TTA is tried at the best size without it only


@dataclass(frozen=True)
class ExtractionSettings:
    """How a model turns an image into a descriptor: the square input side and whether TTA is on."""

    input_size: int
    tta: bool = False

    @property
    def label(self) -> str:
        return f"{self.input_size} px" + (" + TTA" if self.tta else "")

    @property
    def cost(self) -> float:
        """Relative compute per image (pixels x passes): ties in the grid go to the cheaper setting."""
        passes = 2 * (0.5 + 1.0 + 2.0) if self.tta else 1.0  # TTA: 3 scales (area 1/2, 1, 2) x 2 flips
        return self.input_size ** 2 * passes

    def key(self) -> str:
        """``224_tta`` / ``128``: a metric-name-safe name."""
        return f"{self.input_size}{'_tta' if self.tta else ''}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_sizes(text: str | Sequence[int], train_size: int) -> list[int]:
    """``"0,160,224"`` -> ``[128, 160, 224]`` for a model trained at 128 (0 = the training size); sorted, unique."""
    items = [str(t).strip() for t in (text.split(",") if isinstance(text, str) else text)]
    sizes = set()
    for item in items:
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise ConfigError("sizes", f"'{item}' is not an integer side in px (0 = the training size)") from None
        if value < 0 or (0 < value < 32) or value > 2048:
            raise ConfigError("sizes", f"{value} px: a side must be 0 (the training size) or 32-2048 px")
        sizes.add(value or int(train_size))
    if not sizes:
        raise ConfigError("sizes", f"no size in '{text}'")
    return sorted(sizes)


def parse_tta(text: str | Sequence[bool]) -> list[bool]:
    """``"false,true"`` -> ``[False, True]``."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        try:
            out.add(parse_bool(item))
        except ValueError as exc:
            raise ConfigError("tta", str(exc)) from None
    if not out:
        raise ConfigError("tta", f"no value in '{text}'")
    return sorted(out)


def grid(sizes: Sequence[int], ttas: Sequence[bool]) -> list[ExtractionSettings]:
    return [ExtractionSettings(s, t) for s in sizes for t in ttas]


def choose(rows: Sequence[dict[str, Any]]) -> ExtractionSettings:
    """The grid's row with the best ``average_precision``; a tie goes to the cheaper setting."""
    if not rows:
        raise ConfigError("grid", "no setting was scored")
    best = max(rows, key=lambda r: (round(float(r["average_precision"]), 6), -r["settings"].cost))
    return best["settings"]


class _DecodedImages:
    """The grid's images, each decoded once and kept in memory (8-bit PIL images; val is small), then
    resized to every size the grid tries: the decode is shared by all sizes and TTA passes.

    Decoded with JPEG draft for the largest side the grid loads (the draft keeps >= 2x that side, as
    :class:`isc.extract.decode.EvalTransform` does), so at each size the plain descriptors are those of
    ``isc extract`` at that size whenever the image is not over twice the largest side (the mini data's
    always), and within the draft tolerance of docs/descriptors.md otherwise."""

    def __init__(self, paths: Sequence[Path], largest_side: int):
        from isc.data.images import load_image
        from isc.extract.decode import DRAFT_GAP

        draft = int(np.ceil(largest_side * DRAFT_GAP)) if DRAFT_GAP > 0 else None
        t0 = time.perf_counter()
        self.images = [load_image(p, draft=draft) for p in paths]
        self.decode_seconds = time.perf_counter() - t0

    def describe(self, model: Any, size: int, tta: bool, batch_size: int) -> np.ndarray:
        """Descriptors at ``size`` (with TTA: loaded at the TTA load size, 6 passes), as ``isc extract``."""
        import torch

        from isc.extract.decode import eval_transform_for
        from isc.extract.describe import describe_tensors, tta_load_size

        transform = eval_transform_for(model, tta_load_size(size) if tta else size)
        out = []
        for start in range(0, len(self.images), batch_size):
            batch = torch.stack([transform(img) for img in self.images[start:start + batch_size]])
            out.append(describe_tensors(model, batch, tta=tta))
        return np.concatenate(out, axis=0)


def score_grid(model: Any, data: Any, ground_truth: str | Path, sizes: Sequence[int], ttas: Sequence[bool],
               batch_size: int = 32, tta_sizes: int = 1) -> list[dict[str, Any]]:
    """Val µAP (official protocol, before NES) of the grid ``sizes`` x ``ttas``, by successive halving: every
    size without TTA first, then TTA only at the ``tta_sizes`` sizes that scored best without it (0 = at
    every size; every size too when the grid has no plain setting to rank sizes by). One row per scored
    setting with ``settings``, ``average_precision``, ``recall_p90`` and ``seconds``. Queries are the GT's;
    references are all of ``data``'s.

    Why halving: TTA is 6 passes at up to 2x the pixels (about 7x a plain pass), so TTA at every size was
    most of the grid's cost, and a size that loses without TTA has not been seen to win with it."""
    from isc.io import Descriptors, read_ground_truth
    from isc.metrics import evaluate

    gt = read_ground_truth(ground_truth)
    queries = dict(data.images("query"))
    missing = [q for q in gt.queries if q not in queries]
    if missing:
        raise ConfigError("ground_truth", f"{len(missing)} of its queries have no image in {data.query_dir} "
                                          f"(first: {missing[0]})")
    if tta_sizes < 0:
        raise ConfigError("tta_sizes", f"must be >= 0 (0 = TTA at every size), got {tta_sizes}")
    q_ids = sorted(gt.queries)
    references = data.images("reference")
    r_ids = [i for i, _ in references]
    from isc.extract.describe import tta_load_size

    images = _DecodedImages([queries[q] for q in q_ids] + [p for _, p in references],
                            max(tta_load_size(s) if True in ttas else s for s in sizes))
    log.info("settings grid: %d images decoded once in %.1f s", len(images.images), images.decode_seconds)

    def score(setting: ExtractionSettings) -> dict[str, Any]:
        t0 = time.perf_counter()
        x = images.describe(model, setting.input_size, setting.tta, batch_size)
        seconds = time.perf_counter() - t0
        result = evaluate(Descriptors(x[: len(q_ids)], q_ids, x[len(q_ids):], r_ids), gt)
        log.info("settings %s: val µAP %.4f (%.1f s)", setting.label, result.metrics.average_precision, seconds)
        return {"settings": setting, "average_precision": result.metrics.average_precision,
                "recall_p90": result.metrics.recall_p90, "seconds": seconds}

    rows = [score(ExtractionSettings(s, False)) for s in sizes] if False in ttas else []
    if True in ttas:
        ranked = [r["settings"].input_size for r in sorted(rows, key=lambda r: -r["average_precision"])]
        tried = ranked[:tta_sizes] if (rows and tta_sizes) else list(sizes)
        rows += [score(ExtractionSettings(s, True)) for s in sorted(tried)]
    return rows


# ------------------------------------------------------------------ reading settings back


def settings_of_file(path: str | Path) -> ExtractionSettings | None:
    """The settings a descriptor h5 was extracted with (its ``isc.input_size`` / ``isc.tta`` attributes)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            size, tta = f.attrs.get(Tag.INPUT_SIZE), f.attrs.get(Tag.TTA)
    except OSError:
        return None
    if size is None:
        return None
    return ExtractionSettings(int(size), bool(int(tta or 0)))


def served_settings(checkpoint: str | Path) -> ExtractionSettings | None:
    """The settings a registered / logged pyfunc serves with: its ``model_config`` (``input_size``, ``tta``),
    read from the ``MLmodel`` beside ``artifacts/<checkpoint>``; None for a bare checkpoint."""
    checkpoint = Path(checkpoint)
    mlmodel = checkpoint.parent.parent / "MLmodel"
    if checkpoint.parent.name != "artifacts" or not mlmodel.is_file():
        return None
    from mlflow.models import Model

    config = dict(Model.load(str(mlmodel)).flavors.get("python_function", {}).get("config") or {})
    if not config.get("input_size"):
        return None
    return ExtractionSettings(int(config["input_size"]), bool(config.get("tta", False)))


def resolve(model: Any, registered: ExtractionSettings | None, input_size: int | None,
            tta: bool | None) -> tuple[ExtractionSettings, str]:
    """The settings to extract with and where they came from: explicit values win, then the registered
    version's, then the model's training size without TTA."""
    train_size = int(getattr(model, "model_config", {}).get("input_size") or 0)
    base = registered or ExtractionSettings(train_size, False)
    if not base.input_size and not input_size:
        raise ConfigError("input_size", "the model records no input_size; pass one explicitly")
    chosen = ExtractionSettings(int(input_size or base.input_size), base.tta if tta is None else bool(tta))
    explicit = [n for n, v in (("input_size", input_size), ("tta", tta)) if v not in (None, 0)]
    if tta is False:
        explicit.append("tta")
    source = "registered" if registered else "training size"
    if explicit:
        source = f"{source}, {'/'.join(sorted(set(explicit)))} given"
    return chosen, source
