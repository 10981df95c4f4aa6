"""Checkpoint retention: a run keeps its last checkpoint, its hand-off epochs, its best epoch and its resume
source, in the MLflow run and in its local folder; ``keep_checkpoints: all`` keeps every epoch.

Real training of the tiny backbone on the tiny mini dataset, real stores (SQLite + local artifacts, and a
real ``mlflow server`` proxying artifacts).
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from isc import tracking as isc_tracking
from isc.errors import ConfigError
from isc.models import load_checkpoint
from isc.models.checkpoint import checkpoint_name
from isc.recipe import PROFILES, handoff_epochs, stage_overrides
from isc.train import load_config, train
from isc.train.config import validate_config
from isc.train.retention import Retention

TINY = dict(backbone="test_efficientnet", input_size=32, batch_size=4, memory_size=64, workers=0,
            max_steps_per_epoch=2, log_every_steps=1, stage="demo", seed=3, lr=0.05)


def tiny_cfg(mini_data, **kw):
    return load_config(None, data=str(mini_data.root), **{**TINY, **kw})


def ckpts(*epochs: int) -> set[str]:
    return {checkpoint_name(e) for e in epochs}


def in_run(run_id: str) -> set[str]:
    return {Path(a.path).name for a in MlflowClient().list_artifacts(run_id, "checkpoints")}


def on_disk(output_dir: Path) -> set[str]:
    return {p.name for p in (output_dir / "checkpoints").glob("checkpoint_*.pth.tar")}


def test_rule_keeps_the_newest_the_handoffs_the_best_and_the_resume_source():
    names = [checkpoint_name(e) for e in range(6)] + ["checkpoint_0006-step000003.pth.tar", "summary.csv"]
    rule = Retention(1, frozenset({1, 4, 9}), frozenset({"checkpoint_0002.pth.tar"}))
    # the newest is the mid-epoch one of epoch 6; epoch 9 was never written; summary.csv is no checkpoint
    assert rule.kept(names) == {"checkpoint_0006-step000003.pth.tar", *ckpts(1, 4, 2)}
    assert rule.kept(names, best_epoch=3) == {"checkpoint_0006-step000003.pth.tar", *ckpts(1, 2, 3, 4)}
    assert Retention(2).kept(names) == {"checkpoint_0006-step000003.pth.tar", *ckpts(5)}
    assert Retention(0, frozenset({1})).kept(names) == {*names[:-1]}  # 0 = every checkpoint


def test_keep_parameters_parse_and_bad_values_name_the_parameter(mini_data):
    assert tiny_cfg(mini_data, keep_checkpoints="all").keep_checkpoints == 0
    assert tiny_cfg(mini_data, keep_epochs="5, 4,4").keep_epochs == [4, 5]
    assert tiny_cfg(mini_data, keep_epochs="[1]").keep_epochs == [1]
    assert tiny_cfg(mini_data, keep_epochs="").keep_epochs == []
    assert tiny_cfg(mini_data, keep_best="none").keep_best is None
    assert TINY.get("keep_checkpoints") is None and tiny_cfg(mini_data).keep_checkpoints == 1  # the default
    for bad, param in (({"keep_checkpoints": "some"}, "keep_checkpoints"), ({"keep_epochs": "four"}, "keep_epochs"),
                       ({"keep_epochs": [1.5]}, "keep_epochs")):
        with pytest.raises(ConfigError, match=f"^{param}: "):
            tiny_cfg(mini_data, **bad)
    for bad, param in (({"keep_checkpoints": -1}, "keep_checkpoints"), ({"keep_epochs": [-2]}, "keep_epochs")):
        with pytest.raises(ConfigError, match=f"^{param}: "):
            validate_config(tiny_cfg(mini_data, **bad))


@pytest.mark.parametrize("profile", ["full", "demo"])
def test_driver_passes_each_stages_handoff_epochs_and_the_configs_name_them_too(profile):
    stages = {s.name: s for s in PROFILES[profile].stages}
    handoffs = handoff_epochs(PROFILES[profile].stages)
    assert handoffs == {"stage1": [4], "stage1b": [5], "stage2": [5], "stage3": [1]}
    assert stage_overrides(stages["stage2"], {"epochs": 9}, handoffs) == {"epochs": 9, "keep_epochs": [5]}
    # a job-wide keep_epochs is added to, not replaced; stages nobody starts from get none
    assert stage_overrides(stages["stage1b"], {"keep_epochs": "2"}, handoffs)["keep_epochs"] == [2, 5]
    assert stage_overrides(stages["stage4"], {}, handoffs) == {}
    assert stage_overrides(stages["stage0"], {}, handoffs) == {"epochs": 0}  # stage 1 takes its final model
    # a stage trained by hand from its config (docs/training.md's table) keeps the same hand-offs
    for name, epochs in handoffs.items():
        assert load_config(stages[name].config).keep_epochs == epochs
    assert handoff_epochs(PROFILES["smoke"].stages) == {}


@pytest.mark.slow
def test_default_keeps_last_and_handoffs_all_keeps_every_epoch_and_the_kept_ones_resume(tracking, mini_data,
                                                                                       tmp_path):
    default = train(tiny_cfg(mini_data, epochs=5, keep_epochs=[1, 3], output_dir=str(tmp_path / "default")))
    assert in_run(default.run_id) == ckpts(1, 3, 4) == on_disk(tmp_path / "default")
    every = train(tiny_cfg(mini_data, epochs=5, keep_checkpoints="all", output_dir=str(tmp_path / "all")))
    assert in_run(every.run_id) == ckpts(0, 1, 2, 3, 4) == on_disk(tmp_path / "all")
    # the same training, so the same files: retention dropped exactly the two epochs nobody needs. (Sizes
    # agree up to the stored config -- output_dir, keep_* -- whose length moves the archive's 64-byte
    # record alignment with the temp path's: so within 1 KiB, not to the byte.)
    sizes = {Path(a.path).name: a.file_size for a in MlflowClient().list_artifacts(every.run_id, "checkpoints")}
    kept = {Path(a.path).name: a.file_size for a in MlflowClient().list_artifacts(default.run_id, "checkpoints")}
    assert all(abs(kept[n] - sizes[n]) <= 1024 for n in ckpts(1, 3, 4))
    assert sum(kept.values()) < 0.7 * sum(sizes.values())  # 3 of 5 epochs

    # a hand-off: the next stage starts from <run id>:1
    init = train(tiny_cfg(mini_data, epochs=1, init_from=f"{default.run_id}:1", seed=11))
    assert MlflowClient().get_run(init.run_id).data.params["init_checkpoint"].endswith("checkpoint_0001.pth.tar")
    # resume_from=<finished run id>: its last kept checkpoint, then epoch 5 only
    more = train(tiny_cfg(mini_data, epochs=6, resume_from=default.run_id, output_dir=str(tmp_path / "more")))
    run = MlflowClient().get_run(more.run_id)
    assert run.data.params["resumed_from_checkpoint"].endswith("checkpoint_0004.pth.tar")
    assert [m.step for m in MlflowClient().get_metric_history(more.run_id, "epoch_loss")] == [5]
    assert in_run(more.run_id) == ckpts(5) and load_checkpoint(more.final_model_path)["epoch"] == 6


@pytest.mark.slow
def test_best_epoch_by_validation_metric_is_kept_until_a_better_one(tracking, mini_data, tmp_path):
    scores = [0.2, 0.5, 0.3, 0.1]
    returned = train(tiny_cfg(mini_data, epochs=4, output_dir=str(tmp_path / "a")),
                     epoch_callback=lambda epoch, model: {"val_average_precision": scores[epoch]})
    assert in_run(returned.run_id) == ckpts(1, 3) == on_disk(tmp_path / "a")  # best (0.5) + last

    # a callback that logs the metric itself, as tuning trials do; the last epoch is the best
    later = [0.2, 0.5, 0.3, 0.9]

    def log_itself(epoch, model):
        isc_tracking.log_metrics({"val_average_precision": later[epoch]}, step=epoch)

    logged = train(tiny_cfg(mini_data, epochs=4, output_dir=str(tmp_path / "b")), epoch_callback=log_itself)
    assert in_run(logged.run_id) == ckpts(3) == on_disk(tmp_path / "b")  # epoch 1's was pruned once beaten

    off = train(tiny_cfg(mini_data, epochs=4, keep_best="none", output_dir=str(tmp_path / "c")),
                epoch_callback=lambda epoch, model: {"val_average_precision": scores[epoch]})
    assert in_run(off.run_id) == ckpts(3)


@pytest.mark.slow
def test_crash_resume_of_the_same_run_keeps_its_resume_source(tracking, mini_data, tmp_path):
    out = tmp_path / "run"

    def crash(epoch, model):
        if epoch == 1:
            raise RuntimeError("process died after epoch 1")

    with pytest.raises(RuntimeError, match="died"):
        train(tiny_cfg(mini_data, epochs=4, output_dir=str(out)), epoch_callback=crash)
    [crashed] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert crashed.info.status == "FAILED" and in_run(crashed.info.run_id) == ckpts(1) == on_disk(out)

    done = train(tiny_cfg(mini_data, epochs=4, resume_from=crashed.info.run_id, output_dir=str(out)))
    assert done.run_id == crashed.info.run_id  # the same run continued
    assert in_run(done.run_id) == ckpts(1, 3) == on_disk(out)  # the resume source stays, the last is kept


@contextlib.contextmanager
def _undeletable(path: Path):
    """``chattr +i``: even root cannot delete the file (a store that refuses deletion, for real)."""
    probe = path.parent / "probe"
    probe.write_bytes(b"x")
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        probe.unlink()
        pytest.skip("chattr +i is not available on this file system")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    locked: list[Path] = []
    try:
        yield locked
    finally:
        for p in locked:
            subprocess.run(["chattr", "-i", str(p)], check=False)


@pytest.mark.slow
def test_a_store_that_refuses_deletion_costs_a_warning_not_the_training(tracking, mini_data, tmp_path, caplog):
    out = tmp_path / "run"
    with _undeletable(tmp_path) as locked:

        def lock_first(epoch, model):
            if epoch == 0:  # checkpoint_0000 is uploaded by now: make the store's copy undeletable
                run = mlflow.active_run()
                store = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints" / checkpoint_name(0)
                assert subprocess.run(["chattr", "+i", str(store)]).returncode == 0
                locked.append(store)

        with caplog.at_level(logging.WARNING, logger="isc.train.retention"):
            result = train(tiny_cfg(mini_data, epochs=3, output_dir=str(out)), epoch_callback=lock_first)
        assert MlflowClient().get_run(result.run_id).info.status == "FINISHED"
        assert in_run(result.run_id) == ckpts(0, 2) and on_disk(out) == ckpts(2)
        warnings = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
        assert len(warnings) == 1 and checkpoint_name(0) in warnings[0]  # once, naming the file


@pytest.mark.slow
def test_proxied_artifacts_of_an_mlflow_server_are_deleted_on_the_server(mlflow_server, mini_data, tmp_path,
                                                                          monkeypatch):
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ISC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    result = train(tiny_cfg(mini_data, epochs=3, keep_epochs=[0], experiment_name="proxied",
                            output_dir=str(tmp_path / "out")))
    assert MlflowClient().get_run(result.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert in_run(result.run_id) == ckpts(0, 2) == on_disk(tmp_path / "out")
    # gone from the server's disk, not only from the listing
    served = tmp_path / "mlflow_server" / "artifacts"
    assert {p.name for p in served.rglob("checkpoint_*.pth.tar")} == ckpts(0, 2)
    more = train(tiny_cfg(mini_data, epochs=4, resume_from=result.run_id, output_dir=str(tmp_path / "more")))
    assert [m.step for m in MlflowClient().get_metric_history(more.run_id, "epoch_loss")] == [3]
