"""isc.redact: one redaction for params, tags, summaries, logs and error lines (table-driven)."""

from __future__ import annotations

import io
import logging

import pytest

from isc.redact import REDACTED, RedactingFilter, install_log_redaction, is_secret_key, redact, safe_value

GH = "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"

# (text, the secret that must disappear, a part that must survive)
LEAKS = [
    ("postgresql+psycopg2://isc:pg-S3cret@db.internal:5432/optuna", "pg-S3cret", "db.internal:5432/optuna"),
    ("postgresql://isc:p/ss@w0rd@db.internal/mlflow", "p/ss@w0rd", "db.internal/mlflow"),
    ("postgresql://isc:a@b@c/d@db.internal:5432/x", "a@b@c/d", "db.internal:5432/x"),
    ("http://admin:pw%40x@10.0.0.5:5000", "pw%40x", "10.0.0.5:5000"),
    (f"https://{GH}@github.com/org/repo.git", GH, "github.com/org/repo.git"),
    (
        "https://x-access-token:ghs_abcdefghij0123456789xyz@github.com/o/r",
        "ghs_abcdefghij0123456789xyz",
        "github.com",
    ),
    (
        "https://9f8e7d6c5b4a39281706f5e4d3c2b1a0@sentry.example.org/1",
        "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "sentry",
    ),
    ("isc tune --storage x --password hunter2 --n-trials 3", "hunter2", "--n-trials 3"),
    ("cmd --db-pass=hunter2 --k 10", "hunter2", "--k 10"),
    ("cmd --api-key 'k e y' --x 1", "k e y", "--x 1"),
    ('{"user": "alice", "password": "hunter2", "n": 3}', "hunter2", '"user": "alice"'),
    ("{'db_pass': 'hunter2', 'k': 10}", "hunter2", "'k': 10"),
    (
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc123",
        "eyJhbGciOiJIUzI1NiJ9.e30.abc123",
        "Authorization",
    ),
    ("Authorization: Basic YWRtaW46aHVudGVyMg==", "YWRtaW46aHVudGVyMg==", "Authorization"),
    ("curl -H 'Authorization: token abcdef0123456789' http://h", "abcdef0123456789", "http://h"),
    ("sent bearer abcdefghijklmnop0123 upstream", "abcdefghijklmnop0123", "upstream"),
    ("db_pass=hunter2 k=10", "hunter2", "k=10"),
    ("passphrase=open-sesame", "open-sesame", "passphrase="),
    ("private_key=MIIEvQIBADANBg", "MIIEvQIBADANBg", "private_key="),
    ("db.internal:5432:mlflow:isc:pgpass-S3cret", "pgpass-S3cret", "db.internal:5432:mlflow:isc:"),
    ("*:*:*:isc:star-S3cret", "star-S3cret", "isc:"),
    (
        "https://acct.blob.core.windows.net/c/b?sv=2022-11-02&se=2026&sig=AbC%2Bdef%3D&sp=r",
        "AbC%2Bdef%3D",
        "sp=r",
    ),
    (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=abc/def+ghi==;EndpointSuffix=x",
        "abc/def+ghi==",
        "AccountName=acct",
    ),  # fmt: skip
    (
        "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=0a1b2c3d4e&X-Amz-Date=1",
        "0a1b2c3d4e",
        "X-Amz-Date=1",
    ),  # fmt: skip
    ("https://b.s3.amazonaws.com/k?X-Amz-Security-Token=FwoGZXIvYXdz&x=1", "FwoGZXIvYXdz", "x=1"),
    ("host=db user=isc password='s3 cret' dbname=m", "s3 cret", "dbname=m"),
    ('host=db password="s3;cret" dbname=m', "s3;cret", "dbname=m"),
    (f"cloned with {GH} ok", GH, "ok"),
    (
        "token github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstu used",
        "github_pat_11ABCDEFG0123456789_abc",
        "used",
    ),
    (
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
        "wJalrXUtnFEMI/K7MDENG",
        "aws_secret_access_key",
    ),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY", "wJalrXUtnFEMI/K7MDENG", "AWS_SECRET"),
    ("key id AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "key id"),
    ("https://api.x.org/v1?api_key=abc123&q=1", "abc123", "q=1"),
    ("https://h/x?token=abc123&n=1", "abc123", "n=1"),
    ("https://h/x?access_token=abc123", "abc123", "access_token="),
    ("MLFLOW_TRACKING_PASSWORD=hunter2 rest", "hunter2", "rest"),
    ("X-Api-Key: abcdef123456", "abcdef123456", "X-Api-Key"),
    ("password: hunter2\nuser: alice", "hunter2", "user: alice"),
    ("clientSecret=hunter2", "hunter2", "clientSecret"),
    ("slack xoxb-1234567890-abcdefghij", "xoxb-1234567890-abcdefghij", "slack"),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "MIIEpAIBAAKCAQEA",
        "PRIVATE KEY",
    ),  # fmt: skip
    ("a postgresql://u:p1@h/db and mysql://v:q2@k/db", "p1@", "mysql://v:"),
]


@pytest.mark.parametrize(("text", "secret", "kept"), LEAKS, ids=[f"leak{i:02d}" for i in range(len(LEAKS))])
def test_redact_masks_every_secret_form_and_keeps_the_rest(text, secret, kept):
    out = redact(text)
    assert secret not in out, out
    assert REDACTED in out, out
    assert kept in out, out
    assert redact(out) == out  # idempotent: masking twice changes nothing


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////abs/path/mlflow.db",
        "postgresql+psycopg2://isc@127.0.0.1:5432/mlflow",  # user, no password
        "http://127.0.0.1:5000",
        "http://127.0.0.1:5000/models/isc@champion",  # ':5000/...@' is a port and a path, not a password
        "runs:/0123456789abcdef0123456789abcdef/descriptors",
        "models:/isc-descriptor@champion",
        "max_tokens=5 margin=0.5",
        "--k 10 --beta 0.35 --data /data/disc21 --tokenizer bpe",
        "error: k: 1000 > the 64 training descriptors",
        "Basic auth on the team server",
        "2026-11-28 20:17:41,123 INFO isc.driver: step train reusing finished run",
        "git@github.com:org/repo.git",
        '{"k": 10, "beta": 0.35, "keyframe": 3}',
    ],
)
def test_redact_leaves_secret_free_text_unchanged(text):
    assert redact(text) == text


@pytest.mark.parametrize(
    "key",
    ["db_password", "MLFLOW_TRACKING_PASSWORD", "api_key", "aws.secret_access_key", "token", "db_pass",
     "passphrase", "private_key", "X-Amz-Signature", "sig", "AccountKey", "clientSecret", "auth_token",
     "apiKey", "GITHUB_TOKEN", "aws_session_token", "Authorization"],
)  # fmt: skip
def test_secret_names(key):
    assert is_secret_key(key)
    assert safe_value(key, "anything") == REDACTED


@pytest.mark.parametrize(
    "key", ["max_tokens", "tokenizer", "storage", "data", "pos_margin", "keyframe", "num_passes", "bypass",
            "signature_dim", "compass"],
)  # fmt: skip
def test_not_secret_names(key):
    assert not is_secret_key(key)
    assert safe_value(key, "value") == "value"


def test_log_filter_masks_records_of_child_loggers_and_their_tracebacks():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install_log_redaction()
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        logger = logging.getLogger("isc.driver")  # a child logger: only a handler filter sees its records
        old = logger.level
        logger.setLevel(logging.INFO)
        logger.info("storage %s", "postgresql://isc:pg-S3cret@db/optuna")
        try:
            raise RuntimeError("cannot connect to http://admin:hunter2@127.0.0.1:5000")
        except RuntimeError:
            logger.exception("failed with --password %s", "hunter3")
        logger.setLevel(old)
    finally:
        root.removeHandler(handler)
    text = stream.getvalue()
    assert "pg-S3cret" not in text and "hunter2" not in text and "hunter3" not in text, text
    assert "db/optuna" in text and "127.0.0.1:5000" in text and "Traceback" in text


def test_error_line_of_an_entry_point_is_redacted(tracking, capsys):
    from entrypoints.cli import run_entrypoint

    # A missing descriptor file whose name holds a URL password: the error line names it, masked.
    rc = run_entrypoint("entrypoints.match", ["--descriptors", "http://u:hunter2@127.0.0.1:9/d.h5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "hunter2" not in err and "error:" in err, err


def test_main_job_summary_text_is_redacted():
    """What ``isc.driver._report`` writes to ``summary/summary.txt``, passed through :func:`redact`."""
    lines = [
        "== steps ==",
        "champion: models:/isc-descriptor@champion = version 3 (chosen on ground_truth_val.csv)",
        "MLflow UI:        mlflow server --backend-store-uri "
        "postgresql+psycopg2://isc:pg%2FS3cret@db:5432/mlflow --host 127.0.0.1 --port 5000",
        "MLflow UI:        http://alice:hunter2@mlflow.internal:5000",
        "Optuna dashboard: optuna-dashboard postgresql://isc:opt-S3cret@db/optuna --host 127.0.0.1",
    ]
    out = redact("\n".join(lines))
    for secret in ("pg%2FS3cret", "hunter2", "opt-S3cret"):
        assert secret not in out, out
    assert "db:5432/mlflow --host 127.0.0.1 --port 5000" in out
    assert "http://alice:***@mlflow.internal:5000" in out
    assert out.splitlines()[:2] == lines[:2]
