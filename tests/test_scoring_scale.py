"""Silent wrong results of the hostile round: a scale change that keeps the ranking keeps µAP; descriptors
that are all zero (or one constant vector) are refused by name; ``postprocess`` refuses a ``--beta`` that
would zero its output. Real faiss, real h5 files, a real SQLite store, the CLI path."""

from __future__ import annotations

import numpy as np
import pytest

from entrypoints.cli import run_entrypoint
from isc.io import Descriptors, write_descriptors, write_ground_truth, write_train_descriptors
from isc.metrics import evaluate
from isc.postprocess import l2_normalize

NQ, NR, D = 40, 300, 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def setup():
    """Unit references; 20 queries are noisy copies of references, 20 are distractors."""
    rng = np.random.default_rng(7)
    ref = _unit(rng.standard_normal((NR, D)))
    q = np.empty((NQ, D), np.float32)
    q[:20] = _unit(ref[:20] + 0.9 * rng.standard_normal((20, D)) / np.sqrt(D))
    q[20:] = _unit(rng.standard_normal((20, D)))
    qids, rids = [f"Q{i:05d}" for i in range(NQ)], [f"R{i:06d}" for i in range(NR)]
    return q, ref, qids, rids


def _gt(tmp_path, qids, rids):
    from isc.io import read_ground_truth

    path = write_ground_truth(tmp_path / "gt.csv", [(qids[i], rids[i] if i < 20 else None) for i in range(NQ)])
    return path, read_ground_truth(path)


@pytest.mark.parametrize("scale", [1e6, 1e14])
def test_scaling_the_queries_does_not_change_micro_ap(setup, tmp_path, scale):
    q, ref, qids, rids = setup
    _, gt = _gt(tmp_path, qids, rids)
    base = evaluate(Descriptors(q, qids, ref, rids), gt)
    scaled = evaluate(Descriptors((q * np.float32(scale)).astype(np.float32), qids, ref, rids), gt)
    assert 0.2 < base.metrics.average_precision < 1.0  # a ranking with something to lose
    for key in ("average_precision", "recall_p90", "recall_at_rank1", "recall_at_rank10", "n_true_positives"):
        assert getattr(scaled.metrics, key) == pytest.approx(getattr(base.metrics, key), abs=1e-9), key


def test_mixed_norms_are_still_scored_as_given(setup, tmp_path):
    """The scale of descriptors whose norms differ is information: L2 on them is not cosine."""
    q, ref, qids, rids = setup
    _, gt = _gt(tmp_path, qids, rids)
    weights = np.linspace(0.5, 2.0, NQ, dtype=np.float32)[:, None]
    base = evaluate(Descriptors(q, qids, ref, rids), gt)
    mixed = evaluate(Descriptors(q * weights, qids, ref, rids), gt)
    assert mixed.metrics.average_precision != pytest.approx(base.metrics.average_precision, abs=1e-6)


def _run(entry, argv, capsys):
    rc = run_entrypoint(f"entrypoints.{entry}", [str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return rc, err


@pytest.mark.parametrize("what", ["zero", "constant"])
def test_evaluate_refuses_all_zero_or_constant_descriptors_by_name(setup, tmp_path, tracking, capsys, what):
    q, ref, qids, rids = setup
    gt_path, _ = _gt(tmp_path, qids, rids)
    bad = np.zeros_like(q) if what == "zero" else np.tile(q[:1], (NQ, 1))
    h5 = write_descriptors(tmp_path / f"{what}.h5", bad, qids, ref, rids)
    rc, err = _run("evaluate", ["--descriptors", h5, "--ground-truth", gt_path, "--bootstrap", "0"], capsys)
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(h5) in lines[0] and "every query descriptor is" in lines[0], err
    assert ("all zero" if what == "zero" else "one constant vector") in lines[0]


def test_postprocess_refuses_a_beta_that_zeroes_the_output(setup, tmp_path, tracking, capsys):
    q, ref, qids, rids = setup
    desc = write_descriptors(tmp_path / "d.h5", q, qids, ref, rids)
    train = write_train_descriptors(tmp_path / "t.h5", ref[:64], [f"T{i:03d}" for i in range(64)])
    out = tmp_path / "out" / "nes.h5"
    rc, err = _run("postprocess", ["--descriptors", desc, "--train-descriptors", train, "--output", out,
                                   "--beta", "1e30"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: beta: 1e+30 > 100"), err
    assert not out.exists() and not out.parent.exists()


def test_l2_normalize_of_large_rows_gives_unit_rows_not_zeros():
    x = np.full((2, 8), 3e20, np.float32)  # squares overflow float32
    y = l2_normalize(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
