"""Extraction settings chosen on val and carried by the registered model (isc/settings.py, `isc settings`,
`isc extract` / the pyfunc / promotion): real tiny models, real images, a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from isc.errors import ConfigError
from isc.io import read_descriptors
from isc.settings import ExtractionSettings, choose, parse_sizes, parse_tta, settings_of_file

TINY = "test_efficientnet"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from isc.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(TINY, pretrained=False, input_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pth.tar", model, epoch=0)


def test_grid_syntax_resolves_the_training_size_and_names_bad_values():
    assert parse_sizes("0,160,224,160", train_size=128) == [128, 160, 224]
    assert parse_tta("false, true") == [False, True]
    with pytest.raises(ConfigError, match="sizes.*'big'"):
        parse_sizes("0,big", 128)
    with pytest.raises(ConfigError, match="sizes.*16 px"):
        parse_sizes("16", 128)
    with pytest.raises(ConfigError, match="tta"):
        parse_tta("maybe")


def test_choice_is_the_best_val_uap_and_a_tie_goes_to_the_cheaper_setting():
    rows = [{"settings": ExtractionSettings(128), "average_precision": 0.40},
            {"settings": ExtractionSettings(224, True), "average_precision": 0.55},
            {"settings": ExtractionSettings(224), "average_precision": 0.55},
            {"settings": ExtractionSettings(160, True), "average_precision": 0.50}]
    assert choose(rows) == ExtractionSettings(224, False)
    assert choose(rows[:2] + rows[3:]) == ExtractionSettings(224, True)


def test_grid_halves_tta_to_the_best_plain_size_and_scores_what_extract_would_make(mini_data, checkpoint):
    """Successive halving: every size without TTA, TTA only at the best of them (tta_sizes=1) or at every size
    (0); the grid's descriptors are those of `isc extract` at each setting (decoded once, resized per size)."""
    from isc.extract.describe import describe_images
    from isc.models import load_model
    from isc.settings import _DecodedImages, score_grid

    model = load_model(checkpoint)
    gt = mini_data.ground_truth("val")
    rows = score_grid(model, mini_data, gt, [32, 40, 48], [False, True], batch_size=16, tta_sizes=1)
    plain = {r["settings"].input_size: r["average_precision"] for r in rows if not r["settings"].tta}
    assert sorted(plain) == [32, 40, 48]
    tta = [r["settings"] for r in rows if r["settings"].tta]
    assert tta == [ExtractionSettings(max(plain, key=plain.get), True)]  # TTA at the plain best only
    every = score_grid(model, mini_data, gt, [32, 48], [False, True], batch_size=16, tta_sizes=0)
    assert [r["settings"].key() for r in every] == ["32", "48", "32_tta", "48_tta"]
    assert {r["settings"].key(): r["average_precision"] for r in every}["48"] == pytest.approx(plain[48], abs=1e-9)
    with pytest.raises(ConfigError, match="tta_sizes"):
        score_grid(model, mini_data, gt, [32], [False, True], tta_sizes=-1)

    paths = [p for _, p in mini_data.images("reference")[:12]]
    images = _DecodedImages(paths, largest_side=68)
    for size, on in ((48, False), (40, True)):
        np.testing.assert_allclose(images.describe(model, size, on, batch_size=5),
                                   describe_images(model, paths, input_size=size, tta=on, batch_size=5), atol=1e-5)


def test_settings_step_logs_the_scored_settings_and_chooses_the_val_best(tracking, mini_data, checkpoint, capsys):
    from entrypoints.settings import main

    assert main(["--model", str(checkpoint), "--data", str(mini_data.root), "--sizes", "0,48",
                 "--ground-truth", str(mini_data.ground_truth("val")), "--batch-size", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    grid = {k.removeprefix("val_uAP_"): v for k, v in metrics.items() if k.startswith("val_uAP_")}
    best_plain = max(("32", "48"), key=lambda k: (grid[k], -int(k)))  # 0 = the checkpoint's training size
    assert set(grid) == {"32", "48", f"{best_plain}_tta"}  # TTA only where plain scored best (--tta-sizes 1)
    best = max(grid, key=grid.get)
    assert f"{params['chosen_input_size']}{'_tta' if params['chosen_tta'] == 'true' else ''}" == best
    assert (tags["isc.step"], tags["isc.input_size"]) == ("settings", params["chosen_input_size"])
    assert (params["train_input_size"], params["tta_sizes"]) == ("32", "1")
    assert out["chosen"]["input_size"] == int(params["chosen_input_size"])
    assert len({round(v, 6) for v in grid.values()}) > 1  # the settings do change val µAP
    table = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/settings/grid.csv")
    assert table.splitlines()[0] == "input_size,tta,val_uAP,recall_p90,seconds" and len(table.splitlines()) == 4


@pytest.mark.slow
def test_champion_pulled_without_flags_extracts_with_its_registered_settings_and_flags_override(
        tracking, mini_data, checkpoint, tmp_path):
    """extract at 48 px + TTA -> evaluate (records the settings) -> promote (version carries them) ->
    `isc extract --model models:/...@champion` with no flags = the explicit-flag extraction; flags override;
    the pyfunc describes images the same way."""
    from entrypoints import evaluate as evaluate_entry
    from entrypoints import extract as extract_entry
    from isc.extract.describe import describe_images
    from isc.models import load_model
    from registry.promote import promote

    common = ["--data", str(mini_data.root), "--sets", "qr", "--workers", "0", "--batch-size", "16"]
    explicit = tmp_path / "explicit"
    assert extract_entry.main(["--model", str(checkpoint), *common, "--input-size", "48", "--tta", "true",
                               "--output-dir", str(explicit)]) == 0
    assert settings_of_file(explicit / "descriptors.h5") == ExtractionSettings(48, True)
    gt = mini_data.ground_truth("val")
    assert evaluate_entry.main(["--descriptors", str(explicit / "descriptors.h5"), "--ground-truth", str(gt),
                                "--model-ref", str(checkpoint), "--bootstrap", "0"]) == 0
    ev = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`isc.step` = 'evaluate'",
                            output_format="list")[0]
    assert (ev.data.tags["isc.input_size"], ev.data.tags["isc.tta"]) == ("48", "true")
    assert (ev.data.params["extract.input_size"], ev.data.params["extract.tta"]) == ("48", "true")

    result = promote(ground_truth=gt)
    assert result.action == "promoted"
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("isc-descriptor", "champion")
    assert (version.tags["isc.input_size"], version.tags["isc.tta"]) == ("48", "true")
    assert "serves with: 48 px + TTA" in version.description

    pulled = tmp_path / "pulled"
    assert extract_entry.main(["--model", "models:/isc-descriptor@champion", *common,
                               "--output-dir", str(pulled)]) == 0
    a, b = read_descriptors(explicit / "descriptors.h5"), read_descriptors(pulled / "descriptors.h5")
    np.testing.assert_allclose(b.query, a.query, atol=1e-5)
    np.testing.assert_allclose(b.reference, a.reference, atol=1e-5)
    assert settings_of_file(pulled / "descriptors.h5") == ExtractionSettings(48, True)
    pulled_run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="params.model = 'models:/isc-descriptor@champion'")[0]
    assert pulled_run.data.params["settings_source"] == "registered"

    overridden = tmp_path / "overridden"
    assert extract_entry.main(["--model", "models:/isc-descriptor@champion", *common, "--input-size", "32",
                               "--tta", "false", "--output-dir", str(overridden)]) == 0
    model = load_model(checkpoint)
    queries = [p for _, p in mini_data.images("query")]
    c = read_descriptors(overridden / "descriptors.h5")
    np.testing.assert_allclose(c.query, describe_images(model, queries, input_size=32), atol=1e-5)
    assert np.abs(c.query - a.query).max() > 1e-2  # the override changed what was extracted

    pyfunc = mlflow.pyfunc.load_model("models:/isc-descriptor@champion")
    served = pyfunc.predict([str(p) for p in queries[:6]], params={"postprocess": False})
    np.testing.assert_allclose(served, describe_images(model, queries[:6], input_size=48, tta=True), atol=1e-5)


def test_main_job_refuses_a_bad_settings_grid_before_any_run():
    from isc.recipe import check_arguments

    with pytest.raises(ConfigError, match="sizes"):
        check_arguments("demo", 0, "", settings_sizes="0,big")
    with pytest.raises(ConfigError, match="tta"):
        check_arguments("demo", 0, "", settings_tta="sometimes")
    with pytest.raises(ConfigError, match="settings_top"):
        check_arguments("demo", 0, "", settings_top=-1)


def test_demo_and_full_profiles_choose_settings_on_val_by_default():
    """The grid is on by default where a user pulls a champion: 3 sizes, TTA at the best, the top candidate
    (demo, 2 CPU cores) or the top 2 (full); a flag left empty keeps the profile's value, settings_sizes=0 +
    settings_tta=false turns it off."""
    from isc.recipe import settings_plan

    for profile, top in (("demo", 1), ("full", 2)):
        plan = settings_plan(profile)
        assert (plan.sizes, plan.tta, plan.top, plan.tta_sizes) == ("0,160,224", "false,true", top, 1)
        assert plan.is_grid()
    assert settings_plan("demo", {"top": 0, "sizes": None, "tta": ""}).top == 0
    assert settings_plan("demo", {"top": None}).top == 1
    assert not settings_plan("demo", {"sizes": "0", "tta": "false"}).is_grid()
