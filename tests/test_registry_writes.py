"""Registry writes that two promoters make at once: one writer, correct under real concurrency.

The races are real: threads, each with its own client, write the same rows through a real
``mlflow server`` on 127.0.0.1 backed by SQLite and by PostgreSQL; MLflow's SQL store answers the
loser of an INSERT race with a UNIQUE-constraint error, which the writer must take as done (same value)
or retry (other value). ``decide`` is pure and checked over a table of cases.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from isc.contract import Evaluation, Tag
from isc.errors import ConfigError
from registry.promote import Rules, decide
from registry.writes import RegistryWriter, is_conflict, records

ROOT = Path(__file__).resolve().parent.parent
WRITES = ("set_registered_model_alias", "delete_registered_model_alias", "set_model_version_tag",
          "set_registered_model_tag", "update_model_version")


def test_no_registry_write_outside_the_writer():
    """A direct client call would bring the race back: only registry/writes.py may make these calls."""
    pattern = re.compile(r"\.(" + "|".join(WRITES) + r")\(")
    offenders = []
    for folder in ("isc", "entrypoints", "registry", "bench", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "registry" / "writes.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == [], "registry writes must go through registry.writes.RegistryWriter:\n" + "\n".join(offenders)


@pytest.mark.parametrize("message, conflict", [
    ("(sqlite3.IntegrityError) UNIQUE constraint failed: model_version_tags.key", True),
    ('duplicate key value violates unique constraint "registered_model_alias_pk"', True),
    ("(sqlite3.OperationalError) database is locked", True),
    ("RESOURCE_DOES_NOT_EXIST: Registered Model with name=x not found", False),
    ("INVALID_PARAMETER_VALUE: Invalid alias name", False),
])  # fmt: skip
def test_only_store_conflicts_are_retried(message, conflict):
    assert is_conflict(RuntimeError(message)) is conflict


def test_a_bad_request_is_raised_at_once_not_retried():
    calls = []

    class Client:
        def set_registered_model_alias(self, *args):
            calls.append(args)
            raise ValueError("INVALID_PARAMETER_VALUE: alias 'v1' is reserved")

    with pytest.raises(ValueError, match="reserved"):
        RegistryWriter(Client()).set_alias("m", "v1", "1")
    assert len(calls) == 1


# ---- decide(): a pure function over a table of cases ---------------------------------------------------------

def _cand(ap: float, fp: str = "a" * 64) -> Evaluation:
    return Evaluation(run_id="e" * 32, model_ref="m.pth.tar", average_precision=ap, gt_fingerprint=fp,
                      gt_path="val.csv")


def _ver(v: str, ap: float | None = None, fp: str = "a" * 64, rolled_back: bool = False) -> SimpleNamespace:
    tags = {Tag.GT_FINGERPRINT: fp, Tag.GT_PATH: "val.csv"}
    if ap is not None:
        tags[Tag.AVERAGE_PRECISION] = f"{ap:.6f}"
    if rolled_back:
        tags[Tag.ROLLED_BACK] = "true"
    return SimpleNamespace(version=v, tags=tags)


CASES = [
    # name, candidate µAP, version, champion, previous, rules, expected (action, move, champion, previous)
    ("first champion", 0.5, _ver("1"), None, None, Rules(), ("promoted", True, "1", None)),
    ("already champion", 0.5, _ver("1"), _ver("1", 0.5), None, Rules(), ("unchanged", False, "1", None)),
    ("better", 0.6, _ver("2"), _ver("1", 0.5), None, Rules(), ("promoted", True, "2", "1")),
    ("equal is not better", 0.5, _ver("2"), _ver("1", 0.5), None, Rules(), ("registered", False, "1", None)),
    ("not by the margin", 0.505, _ver("2"), _ver("1", 0.5), None, Rules(min_improvement=0.01),
     ("registered", False, "1", None)),
    ("by the margin", 0.52, _ver("3"), _ver("2", 0.5), _ver("1"), Rules(min_improvement=0.01),
     ("promoted", True, "3", "2")),
    ("worse but forced", 0.1, _ver("2"), _ver("1", 0.5), None, Rules(force=True), ("promoted", True, "2", "1")),
    ("rolled back", 0.9, _ver("2", rolled_back=True), _ver("1", 0.5), None, Rules(),
     ("registered", False, "1", None)),
    ("rolled back, forced", 0.9, _ver("2", rolled_back=True), _ver("1", 0.5), None, Rules(force=True),
     ("promoted", True, "2", "1")),
    ("other ground truth, keep", 0.9, _ver("2"), _ver("1", 0.5, fp="b" * 64), None, Rules(on_other_gt="keep"),
     ("kept", False, "1", None)),
    ("champion without a score", 0.5, _ver("2"), _ver("1"), None, Rules(), ("registered", False, "1", None)),
]  # fmt: skip


@pytest.mark.parametrize("name, ap, version, champion, previous, rules, expected", CASES, ids=[c[0] for c in CASES])
def test_decide(name, ap, version, champion, previous, rules, expected):
    d = decide(_cand(ap), version, True, champion, previous, rules, "m")
    assert (d.action, d.move, d.champion_after, d.previous_after) == expected, d.message


def test_decide_refuses_to_compare_other_ground_truths_by_default():
    with pytest.raises(ConfigError, match="different ground truths"):
        decide(_cand(0.9), _ver("2"), True, _ver("1", 0.5, fp="b" * 64), None, Rules(), "m")


# ---- the writer against a real server, racing for real ---------------------------------------------------------

def _race(n: int, work) -> list[BaseException]:
    """Run ``work(i)`` in ``n`` threads released together; return the errors they raised."""
    gate = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        gate.wait()
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return errors


@pytest.mark.slow
def test_eight_writers_of_the_same_rows_all_succeed_and_lose_no_record(sql_mlflow_server):
    from mlflow import MlflowClient

    setup = MlflowClient(tracking_uri=sql_mlflow_server.url)
    setup.create_registered_model("m")
    run = setup.create_run(setup.create_experiment("writes"))
    for _ in range(2):
        setup.create_model_version("m", run.info.artifact_uri + "/model", run_id=run.info.run_id)
    n = 8

    def work(i: int) -> None:
        w = RegistryWriter(MlflowClient(tracking_uri=sql_mlflow_server.url))
        w.set_alias("m", "champion", "1")  # same value from everyone
        w.set_alias("m", "previous", str(1 + i % 2))  # two values fight: last writer wins
        w.set_version_tag("m", "1", Tag.PROMOTED_OVER, "")
        w.set_version_tag("m", "1", Tag.PROMOTED_AT, f"t{i}")
        w.set_model_tag("m", "owner", "team")
        w.set_version_description("m", "2", "the same words")
        w.append_record("m", Tag.PROMOTION_PREFIX, {"action": "promote", "writer": i})

    for _ in range(2):  # a second round races on rows that now exist (UPDATE path)
        errors = _race(n, work)
        assert errors == [], [repr(e) for e in errors]
    assert setup.get_model_version_by_alias("m", "champion").version == "1"
    assert setup.get_model_version_by_alias("m", "previous").version in ("1", "2")
    v1 = setup.get_model_version("m", "1")
    assert v1.tags[Tag.PROMOTED_OVER] == "" and v1.tags[Tag.PROMOTED_AT] in {f"t{i}" for i in range(n)}
    assert setup.get_registered_model("m").tags["owner"] == "team"
    assert setup.get_model_version("m", "2").description == "the same words"
    recs = records(setup, "m", Tag.PROMOTION_PREFIX)
    assert sorted(r["writer"] for r in recs) == sorted(list(range(n)) * 2)  # every append kept, none overwritten

    w = RegistryWriter(setup)
    w.delete_alias("m", "previous")
    w.delete_alias("m", "previous")  # already gone: done, not an error
    with pytest.raises(Exception, match="previous"):
        setup.get_model_version_by_alias("m", "previous")
