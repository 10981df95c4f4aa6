"""The DISC21 folder layout.

```
ROOT/
  query_images/      Q00000.jpg ...   (ids = file stems, sorted)
  reference_images/  R000000.jpg ...
  training_images/   T000000.jpg ...
  ground_truth.csv   query_id,reference_id  (empty reference = distractor query)
```

Mini datasets made by ``isc data make-mini`` add disjoint query splits
``ground_truth_{train,val,test}.csv``: *train* pairs feed stage 4 (v107), *val* scores Optuna trials,
*test* is the held-out split that evaluation and promotion report. The real DISC21 release names its
file ``public_ground_truth.csv``; pass it explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from isc.data.images import IMAGE_EXTENSIONS
from isc.errors import ConfigError

SPLIT_DIRS = {"query": "query_images", "reference": "reference_images", "train": "training_images"}
SPLIT_LETTERS = {"q": "query", "r": "reference", "t": "train"}
HELDOUT_SPLITS = ("val", "test")
MINI_MANIFEST = "mini_manifest.json"  # written by ``isc data make-mini`` (isc.data.mini)


def list_images(folder: str | Path, limit: int | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` for every image file in ``folder``, sorted by id (the file stem)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(str(folder), "image folder does not exist")
    items: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.stem in items:
            raise ConfigError(str(folder), f"two files share the id '{p.stem}': {items[p.stem].name}, {p.name}")
        items[p.stem] = p
    out = sorted(items.items())
    return out[:limit] if limit else out


@dataclass(frozen=True)
class DISC21:
    """Paths of a DISC21-shaped dataset rooted at ``root``."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def split_dir(self, split: str) -> Path:
        split = SPLIT_LETTERS.get(split, split)
        if split not in SPLIT_DIRS:
            raise ConfigError("split", f"unknown split '{split}' (query, reference, train or q/r/t)")
        return self.root / SPLIT_DIRS[split]

    @property
    def query_dir(self) -> Path:
        return self.split_dir("query")

    @property
    def reference_dir(self) -> Path:
        return self.split_dir("reference")

    @property
    def training_dir(self) -> Path:
        return self.split_dir("train")

    def ground_truth(self, split: str | None = None) -> Path:
        """``ground_truth.csv`` (all queries) or ``ground_truth_<split>.csv`` for train/val/test."""
        name = "ground_truth.csv" if split in (None, "", "all") else f"ground_truth_{split}.csv"
        path = self.root / name
        if split in (None, "", "all") and not path.exists() and (self.root / "public_ground_truth.csv").exists():
            path = self.root / "public_ground_truth.csv"
        return path

    def images(self, split: str, limit: int | None = None) -> list[tuple[str, Path]]:
        return list_images(self.split_dir(split), limit)

    def heldout_references(self) -> set[str]:
        """Ids of the references of the held-out splits (val, test): never a training negative.

        The positives of ``ground_truth_val.csv`` / ``ground_truth_test.csv`` where present, plus, in a
        ``make-mini`` folder, every reference cut from a val or test photo (``mini_manifest.json``), queried
        or not. Why: stages 3 and 4 draw extra negatives from the reference folder (v98, v107); the seed draws
        from all of it, the evaluation's references included, which here let stage 4 see every val and test
        photo about ten times, and val then preferred the stage that had seen its photos. Without split files
        or manifest (the seed's ``public_ground_truth.csv`` alone) nothing is held out: the seed's pool."""
        from isc.io import read_ground_truth

        out: set[str] = set()
        for split in HELDOUT_SPLITS:
            path = self.ground_truth(split)
            if path.exists():
                out |= {str(r) for _, r in read_ground_truth(path).positives}
        manifest = self.root / MINI_MANIFEST
        if manifest.exists():
            try:
                m = json.loads(manifest.read_text())
                heldout_photos = {p for split in HELDOUT_SPLITS for p in m.get("photo_splits", {}).get(split, [])}
                out |= {r for r, where in m.get("references", {}).items() if m["photos"][where[0]] in heldout_photos}
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ConfigError(str(manifest), f"unreadable make-mini manifest ({exc!r}); rebuild the folder "
                                                 "with `isc data make-mini` or remove the file") from None
        return out

    def validate(self, splits: str = "qrt") -> None:
        """Raise a ``ConfigError`` naming the first missing folder."""
        for letter in splits:
            d = self.split_dir(letter)
            if not d.is_dir():
                raise ConfigError(str(d), f"missing DISC21 folder under {self.root}")
