"""The full profile on the README's DISC21 layout: inputs checked before any training run, v107's batch as
the seed's, stage 1b's memory bank as the seed's (the whole chain through `main` on this layout, with 2 gloo
ranks per step: tests/test_main_full.py).

The README layout (`--data /data/disc21`) has exactly: query_images/, reference_images/, training_images/,
public_ground_truth.csv (stage 4 trains on every positive of it, as v107.py) and ground_truth_test.csv
(held out: scores the stages and, with no ground_truth_val.csv, chooses the champion).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from isc.errors import ConfigError
from isc.io import read_ground_truth
from isc.losses import NEGATIVE_LABEL_OFFSET
from isc.train import load_config, train

README_FILES = ["public_ground_truth.csv", "ground_truth_test.csv"]
TINY = {"backbone": "test_efficientnet", "pretrained": False, "input_size": 32, "workers": 0, "amp": "false",
        "log_every_steps": 1}


def readme_layout(root: Path, mini, with_val: bool = False) -> Path:
    """The README's DISC21 layout built from the mini data: public GT = the mini's train + val queries
    (what stage 4 may train on), ground_truth_test.csv = its test split (queries disjoint from them).
    ``with_val``: also the README's optional ground_truth_val.csv (the mini's val split, then no longer
    part of the public GT: a split that chooses the champion is never trained on)."""
    root.mkdir()
    for name in ("query_images", "reference_images", "training_images"):
        (root / name).symlink_to(mini.root / name)
    rows = ["query_id,reference_id"]
    for split in ("train",) if with_val else ("train", "val"):
        rows += mini.ground_truth(split).read_text().splitlines()[1:]
    (root / "public_ground_truth.csv").write_text("\n".join(rows) + "\n")
    (root / "ground_truth_test.csv").write_text(mini.ground_truth("test").read_text())
    if with_val:
        (root / "ground_truth_val.csv").write_text(mini.ground_truth("val").read_text())
    return root


@pytest.fixture
def readme_data(tmp_path, mini_data) -> Path:
    return readme_layout(tmp_path / "disc21", mini_data)


def test_readme_layout_passes_the_preflight_and_stage4_trains_on_every_public_positive(readme_data):
    from isc.preflight import check_main_inputs
    from isc.train.config import resolve_pairs_path
    from tests.test_main import TINY_FULL

    assert sorted(p.name for p in readme_data.iterdir() if p.is_file()) == sorted(README_FILES)
    gts = check_main_inputs("full", readme_data, TINY_FULL, n_trials=0)
    # no val split: the champion is chosen on the held-out test GT, never on the public (training) pairs
    assert gts.test == gts.select == readme_data / "ground_truth_test.csv"
    cfg = load_config("stage4", data=str(readme_data))
    assert resolve_pairs_path(cfg) == readme_data / "public_ground_truth.csv"
    # one process: v107's 2G-2 = 0 negatives leave one pair alone in BatchNorm; the check says what to set
    seed_negatives = {k: v for k, v in TINY_FULL.items() if k != "num_negatives"}
    with pytest.raises(ConfigError, match="num_negatives >= 1") as err:
        check_main_inputs("full", readme_data, seed_negatives, n_trials=0)
    assert "1 problem(s)" in str(err.value) and "stage4 (isc/configs/stage4.yaml)" in str(err.value)
    check_main_inputs("full", readme_data, seed_negatives, n_trials=0, world_size=2)  # 1 pair + 2 negatives each


def test_broken_inputs_fail_in_seconds_before_any_training_run_naming_every_file(tracking, readme_data):
    """A missing pairs file, a missing GT, too few references for the negatives and a tuning split the data
    lacks: one message names them all, and `main` stops before its first step (no training run opened)."""
    from entrypoints.main import main

    (readme_data / "public_ground_truth.csv").unlink()
    (readme_data / "ground_truth_test.csv").unlink()
    overrides = json.dumps({**TINY, "num_negatives": 100})  # 64 references in the tiny data
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        main(["--data", str(readme_data), "--profile", "full", "--n-trials", "2", "--overrides", overrides,
              "--experiment-name", "broken"])
    elapsed = time.perf_counter() - t0
    text = str(err.value)
    assert f"{readme_data / 'public_ground_truth.csv'} (the seed's file) does not exist" in text  # stage 4's pairs
    assert "has no ground_truth_test.csv" in text  # the summary's numbers / the champion's choice
    assert "64 reference image(s)" in text and "fewer than the 100 negatives per item" in text  # stage 3
    assert "ground_truth_val.csv" in text and "n_trials=0" in text  # tuning needs a val split
    assert "problem(s) found before any training run" in text
    assert elapsed < 30, elapsed
    client = MlflowClient()
    exp = client.get_experiment_by_name("broken")
    runs = client.search_runs([exp.experiment_id])
    assert [r.data.tags.get("isc.step") for r in runs] == ["main"]  # only the job's own run, marked failed
    assert runs[0].info.status == "FAILED"


def test_the_negative_pool_check_counts_no_held_out_reference(readme_data):
    """64 references, 8 of them the test split's: 60 negatives per item are more than stage 3 may draw."""
    from isc.preflight import check_main_inputs
    from tests.test_main import TINY_FULL

    with pytest.raises(ConfigError) as err:
        check_main_inputs("full", readme_data, {**TINY_FULL, "num_negatives": 60}, n_trials=0, world_size=2)
    assert "56 reference image(s)" in str(err.value) and "outside val and test" in str(err.value)
    check_main_inputs("full", readme_data, {**TINY_FULL, "num_negatives": 30}, n_trials=0, world_size=2)


def test_scoring_on_stage4s_training_pairs_is_refused(readme_data):
    """A test ground truth that shares queries with the pairs stage 4 trains on is refused by name."""
    from isc.preflight import check_main_inputs

    (readme_data / "ground_truth_test.csv").write_text((readme_data / "public_ground_truth.csv").read_text())
    from tests.test_main import TINY_FULL

    with pytest.raises(ConfigError, match="ground_truth_test.csv shares 18 quer") as err:
        check_main_inputs("full", readme_data, TINY_FULL, n_trials=0)
    assert "training pairs" in str(err.value) and "public_ground_truth.csv" in str(err.value)


def test_v107_batch_is_one_pair_and_2g_minus_2_negatives_per_process_over_every_public_positive(readme_data):
    """Two processes (G = 2), one epoch: each step of each process holds one public pair (two images, one
    label) and 2G-2 = 2 references that are no positive of any public pair; every public positive is used."""
    from torch.utils.data import DataLoader

    from isc.data.disc21 import DISC21
    from isc.train.config import validate_config
    from isc.train.datasets import EpochTaggedSampler, ResumableShuffleSampler, collate
    from isc.train.parts import build_dataset

    g = 2
    cfg = load_config("stage4", data=str(readme_data), **TINY)
    assert (cfg.per_process_batch(g), cfg.negatives_at(g), cfg.global_batch(g)) == (1, 2, 2)
    assert (cfg.negatives_at(8), cfg.global_batch(8)) == (14, 8)  # the seed on 8 GPUs: 8 pairs, 14 negatives each
    assert load_config("stage4", num_negatives=5).negatives_at(8) == 5  # settable
    validate_config(cfg, g)
    with pytest.raises(ConfigError, match="batch_per_process"):
        validate_config(cfg, 1)  # one process: one pair and no negative
    dataset, facts = build_dataset(cfg, [0.5] * 3, [0.25] * 3, world_size=g)
    public = read_ground_truth(readme_data / "public_ground_truth.csv")
    assert facts["pairs_path"] == str(readme_data / "public_ground_truth.csv") and facts["n_items"] == 18
    refs = DISC21(readme_data).images("reference")
    positive_refs = {r for _, r in public.positives}
    # minus the references the held-out test split scores: never seen in training (the seed has no such split)
    heldout = {r for _, r in read_ground_truth(readme_data / "ground_truth_test.csv").positives}
    assert heldout and not heldout & positive_refs
    assert facts["n_negative_pool"] == len(refs) - len(positive_refs) - len(heldout)
    assert facts["n_heldout_references_excluded"] == len(heldout)
    pairs_seen, negatives_seen = [], set()
    for rank in range(g):
        sampler = ResumableShuffleSampler(len(dataset), cfg.per_process_batch(g), cfg.seed, rank, g)
        loader = DataLoader(dataset, batch_size=cfg.per_process_batch(g), sampler=EpochTaggedSampler(sampler),
                            collate_fn=collate, drop_last=True)
        steps = 0
        for images, labels, _ in loader:
            steps += 1
            assert images.shape == (2 + 2 * g - 2, 3, 32, 32)
            pair, negs = labels[:2].tolist(), labels[2:].tolist()
            assert pair[0] == pair[1] < NEGATIVE_LABEL_OFFSET and all(n >= NEGATIVE_LABEL_OFFSET for n in negs)
            q, r = dataset.pairs[pair[0]]
            pairs_seen.append((q.stem, r.stem))
            negatives_seen |= {dataset.negatives[n - NEGATIVE_LABEL_OFFSET].stem for n in negs}
            # the images are the plain Resize + Normalize of the pair's files (no augmentation)
            assert torch.equal(images[0], dataset.transform(_open(q))) and torch.equal(images[1], dataset.transform(_open(r)))
        assert steps == len(dataset) // g
    assert sorted(pairs_seen) == sorted(public.positives)  # every public positive, once per epoch
    assert negatives_seen and not negatives_seen & positive_refs


def _open(path: Path):
    from isc.data.images import load_image

    return load_image(path)


@pytest.mark.parametrize("resume_state, restored", [("seed", False), ("exact", True)])
def test_stage1b_resumes_with_an_empty_bank_as_the_seed_unless_told_exact(tracking, mini_data, resume_state, restored):
    """The seed's checkpoints hold no memory bank and no GradScaler: the full profile's 1b (stage1b.yaml,
    resume_state: seed) starts with an empty bank; resume_state=exact restores the checkpoint's bank."""
    from isc.models import load_checkpoint
    from isc.train import distributed as ddp
    from isc.train.parts import restore, setup

    tiny = {**TINY, "data": str(mini_data.root), "batch_size": 4, "memory_size": 64, "max_steps_per_epoch": 2,
            "log_checkpoints": False}
    first = train(load_config("stage1", **tiny, epochs=1))
    ckpt = Path(first.checkpoint_path)
    assert ckpt.name == "checkpoint_0000.pth.tar"
    state = load_checkpoint(ckpt)
    assert state["xbm"] is not None
    overrides = {} if resume_state == "seed" else {"resume_state": "exact"}
    cfg = load_config("stage1b", **tiny, epochs=2, resume_from=str(ckpt), **overrides)
    assert cfg.resume_state == resume_state and cfg.seed == 90  # stage1b.yaml: the seed's 1b, seed 90
    parts = setup(cfg, ddp.DistInfo(), True, None)
    restore(cfg, parts, state, ckpt)
    assert parts.bank_restored is restored
    assert parts.criterion.memory_fill == (16 if restored else 0)  # 2 steps x 4 items x 2 views
    assert parts.start_epoch == 1 and parts.optimizer.state  # weights, optimizer and epoch always come back
    # the run says which it was
    run = train(cfg)
    params = MlflowClient().get_run(run.run_id).data.params
    assert params["resumed_memory_bank"] == ("restored" if restored else "empty")


def test_too_little_disk_for_the_checkpoints_is_named_before_training(readme_data, tmp_path, small_tmpfs):
    """The checkpoints each stage keeps (local + artifact copy), weighed against the free space where they go:
    the tiny network's checkpoints (a 256-slot bank alone is 264 KB) do not fit on a 256 KiB disk. (A bank
    of 10^12 slots, which this test once used, is now refused by the memory bound before the disk check.)"""
    from isc.preflight import check_main_inputs, checkpoint_bytes
    from tests.test_main import TINY_FULL

    small = checkpoint_bytes(load_config("stage1", **TINY_FULL))
    assert 256 * 2**10 < small < 50 * 2**20  # the tiny test network: weights + momentum + a 256-slot bank
    check_main_inputs("full", readme_data, TINY_FULL, out_root=tmp_path / "outputs" / "train")
    with pytest.raises(ConfigError, match=r"disk: .* GiB free; the profile's checkpoints need about"):
        check_main_inputs("full", readme_data, TINY_FULL, out_root=small_tmpfs / "outputs" / "train")


def test_tuning_stage4_on_one_process_without_negatives_is_named_before_training(tmp_path, mini_data):
    """Optuna trials train as one process whatever nproc_per_node is: v107's 2G-2 then gives no negatives,
    which must be said before stage 0, not when the tune step starts after every stage trained."""
    from isc.preflight import check_main_inputs

    root = readme_layout(tmp_path / "disc21", mini_data, with_val=True)
    tiny = {**TINY, "batch_size": 4, "memory_size": 256, "max_steps_per_epoch": 1}
    with pytest.raises(ConfigError, match=r"n_trials > 0: tune trials of stage4 train as one process: "
                                          r"batch_per_process: .* 0 negative\(s\) per item over 1 process"):
        check_main_inputs("full", root, tiny, n_trials=2, world_size=2)
    check_main_inputs("full", root, {**tiny, "num_negatives": 2}, n_trials=2, world_size=2)
    check_main_inputs("full", root, tiny, n_trials=0, world_size=2)
