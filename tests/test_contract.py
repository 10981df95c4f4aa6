"""The run contract: one place for the names steps exchange, and the records built on them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import mlflow
import pytest

from isc.contract import (
    ARTIFACT_DESCRIPTORS,
    DESCRIPTORS_FILE,
    Evaluation,
    ModelRef,
    Step,
    Tag,
    experiment_choice,
    model_uri,
    model_version_uri,
    parse_bool,
    run_artifact_uri,
)
from isc.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RUN = "0123456789abcdef0123456789abcdef"


def _tag_values() -> set[str]:
    return {v for k, v in vars(Tag).items() if not k.startswith("_") and isinstance(v, str)}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.rstrip(".")) is not None
    except ModuleNotFoundError:
        return False


def _code_lines() -> list[tuple[str, str]]:
    """(``path:line``, text) of every line of code outside the contract module that could spell its names."""
    paths = [p for folder in ("isc", "entrypoints", "registry", "bench") for p in sorted((ROOT / folder).rglob("*.py"))
             if p != ROOT / "isc" / "contract.py"]
    return [(f"{p.relative_to(ROOT)}:{n}", line) for p in paths for n, line in enumerate(p.read_text().splitlines(), 1)]


def test_no_tag_literal_outside_the_contract_module():
    """A tag renamed in the contract must change every reader and writer: none spells it itself."""
    literal = re.compile(r"""["'](isc\.[a-z_][a-z0-9_.]*)["']""")
    offenders = [f"{where}: {name}" for where, line in _code_lines() for name in literal.findall(line)
                 if not _is_module(name)]  # a module name (logger names, runpy targets) is not a tag
    assert not offenders, "tag literals outside isc/contract.py:\n" + "\n".join(offenders)


def test_the_grep_above_would_catch_a_tag_literal(tmp_path):
    """The check is not vacuous: every tag value matches the pattern it greps for."""
    literal = re.compile(r"""["'](isc\.[a-z_][a-z0-9_.]*)["']""")
    values = _tag_values()
    assert len(values) >= 30
    for value in values:
        assert literal.findall(f'tags["{value}"]') == [value]
    assert all(v.startswith("isc.") for v in values)


@pytest.mark.parametrize(
    ("text", "kind", "fields"),
    [
        (RUN, "run", {"run_id": RUN}),
        (f"{RUN}:5", "run_epoch", {"run_id": RUN, "epoch": 5}),
        (f"{RUN}:checkpoint_0004.pth.tar", "run_epoch", {"run_id": RUN, "epoch": 4}),
        (f"runs:/{RUN}", "runs", {"run_id": RUN, "path": None}),
        (f"runs:/{RUN}/model/final.pth.tar", "runs", {"run_id": RUN, "path": "model/final.pth.tar"}),
        ("models:/isc-descriptor@champion", "alias", {"name": "isc-descriptor", "alias": "champion"}),
        ("models:/isc-descriptor/3", "version", {"name": "isc-descriptor", "version": "3"}),
        ("models:/m-4f2a", "logged_model", {"name": "m-4f2a"}),
        ("mlflow-artifacts:/1/abc/artifacts/x.pth.tar", "uri", {}),
        ("s3://bucket/key.pth.tar", "uri", {}),
    ],
)
def test_model_ref_parses_every_reference_form(text, kind, fields):
    ref = ModelRef.parse(text)
    assert ref.kind == kind
    for name, value in fields.items():
        assert getattr(ref, name) == value
    assert ref.is_registry == (kind in ("alias", "version"))


def test_model_uris_are_built_by_the_contract_and_parse_back():
    assert model_uri() == "models:/isc-descriptor@champion"
    ref = ModelRef.parse(model_uri("other-model", "previous"))
    assert (ref.kind, ref.name, ref.alias) == ("alias", "other-model", "previous")
    ref = ModelRef.parse(model_version_uri("isc-descriptor", 3))
    assert (ref.kind, ref.name, ref.version) == ("version", "isc-descriptor", "3")
    uri = run_artifact_uri(RUN, ARTIFACT_DESCRIPTORS, DESCRIPTORS_FILE)
    assert uri == f"runs:/{RUN}/descriptors/descriptors.h5"
    assert (ModelRef.parse(uri).run_id, ModelRef.parse(uri).path) == (RUN, "descriptors/descriptors.h5")


# A registry URI spelled in code: an f-string starting models:/, or a whole quoted models:/name@alias literal.
MODEL_URI_LITERAL = re.compile(r"""\bf["']models:/|["']models:/[\w.-]+@[\w.-]+["']""")


def test_no_model_uri_is_spelled_outside_the_contract_module():
    """Every ``models:/NAME@ALIAS`` (and ``models:/NAME/N``) the code builds comes from model_uri() /
    model_version_uri(), so the champion's URI has one spelling."""
    offenders = [f"{where}: {line.strip()}" for where, line in _code_lines() if MODEL_URI_LITERAL.search(line)]
    assert not offenders, "model URIs built outside isc/contract.py:\n" + "\n".join(offenders)
    assert MODEL_URI_LITERAL.search('default="models:/isc-descriptor@champion",')
    assert MODEL_URI_LITERAL.search('uri = f"models:/{name}@{alias}"')
    assert not MODEL_URI_LITERAL.search('help="models:/name@alias or models:/name/version"')


def _artifact_file_names() -> set[str]:
    """The artifact file names the contract defines (folder names such as "checkpoints" or "evaluation"
    are ordinary words elsewhere, e.g. an MLflow dataset context, so only file names are held to it)."""
    from isc import contract

    return {v for k, v in vars(contract).items() if k.isupper() and isinstance(v, str)
            and re.fullmatch(r"[\w/.-]+\.(h5|pth\.tar)", v)}


ARTIFACT_FILE_LITERAL = re.compile(r"""["']([\w/.-]+\.(?:h5|pth\.tar))["']""")


def test_no_artifact_file_name_is_spelled_outside_the_contract_module():
    """A run's artifact files (descriptors.h5, descriptors_nes.h5, nes_bank.h5, model/final.pth.tar, the
    pyfunc's checkpoint) are named once, in isc/contract.py: a rename there reaches every reader."""
    names = _artifact_file_names()
    assert {"descriptors.h5", "descriptors_nes.h5", "nes_bank.h5", "model/final.pth.tar"} <= names
    offenders = [f"{where}: {line.strip()}" for where, line in _code_lines()
                 for name in ARTIFACT_FILE_LITERAL.findall(line) if name in names]
    assert not offenders, "artifact file names spelled outside isc/contract.py:\n" + "\n".join(offenders)
    assert ARTIFACT_FILE_LITERAL.findall('out / "descriptors_nes.h5"') == ["descriptors_nes.h5"]


def test_model_ref_local_path_wins_and_bad_forms_name_the_parameter(tmp_path):
    f = tmp_path / "final.pth.tar"
    f.write_bytes(b"x")
    assert ModelRef.parse(f).kind == "path"
    with pytest.raises(ConfigError, match="model") as e:
        ModelRef.parse(f"{RUN}:five")
    assert "epoch index" in str(e.value)
    with pytest.raises(ConfigError, match="no such file"):
        ModelRef.parse(tmp_path / "missing.pth.tar")
    with pytest.raises(ConfigError, match="empty"):
        ModelRef.parse("  ")


def test_experiment_choice_order(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert experiment_choice(None) == ("name", "isc")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert experiment_choice("") == ("name", "from-env")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "7")
    assert experiment_choice(None) == ("id", "7")
    assert experiment_choice("explicit") == ("name", "explicit")


@pytest.mark.parametrize(("text", "value"), [("yes", True), ("On", True), ("1", True), ("y", True),
                                             ("no", False), ("OFF", False), ("0", False), ("", False)])
def test_one_boolean_parser_for_cli_and_configs(text, value):
    from isc.cliutil import str2bool
    from isc.train.config import TrainConfig, validate_config  # noqa: F401

    assert parse_bool(text) is value
    assert str2bool(text) is value
    with pytest.raises(ValueError, match="expected a boolean"):
        parse_bool("maybe")


def test_evaluation_round_trips_through_a_real_run(tmp_path):
    """What evaluate writes (to_tags + metrics) is what promotion reads (from_run)."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("contract", artifact_location=str(tmp_path / "art"))
    record = Evaluation(average_precision=0.4321, recall_p90=0.25, gt_fingerprint="ab" * 32, gt_path="/gt/val.csv",
                        model_ref=f"{RUN}:5", nes_bank=f"runs:/{RUN}/descriptors/nes_bank.h5",
                        nes_params={"k": 5, "beta": 0.3, "num_iter": 1})
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.set_tags(record.to_tags())
        mlflow.log_metrics({"average_precision": 0.4321, "recall_p90": 0.25})
    back = Evaluation.from_run(mlflow.MlflowClient().get_run(run.info.run_id))
    assert back.run_id == run.info.run_id
    for name in ("average_precision", "recall_p90", "gt_fingerprint", "gt_path", "model_ref", "nes_bank",
                 "nes_params", "protocol"):
        assert getattr(back, name) == getattr(record, name), name
    tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[Tag.STEP] == Step.EVALUATE
