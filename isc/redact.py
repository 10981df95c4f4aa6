"""The one place that decides what is a secret and masks it: params, tags, summaries, logs, error lines.

Why one module: secrets reach text through many doors (storage URLs, tracking URIs with ``user:pw@``,
command lines, JSON configs, HTTP headers, pgpass lines, signed cloud URLs); two half-overlapping
redactors drift apart and each misses what the other catches. Everything that leaves the process --
logged params and tags (:func:`safe_value`), the main job's summary, log records
(:class:`RedactingFilter`) and ``error:`` lines -- goes through :func:`redact`.

Rules are deliberately greedy: masking a harmless value costs a ``***`` in a log, missing a password
leaks it to everyone who can read the experiment.
"""

from __future__ import annotations

import logging
import re

REDACTED = "***"

# --------------------------------------------------------------------------- secret names

_SECRET_WORDS = {
    "password", "passwd", "pwd", "pass", "passphrase", "secret", "token", "apikey", "credential",
    "credentials", "sig", "privatekey", "accountkey", "secretkey", "accesskey", "authorization",
    "sharedaccesssignature", "sessiontoken", "authtoken", "accesstoken", "bearer",
}  # fmt: skip
_SECRET_SUFFIXES = ("password", "passwd", "secret", "token", "passphrase", "apikey")
_SECRET_PAIRS = {
    ("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("account", "key"),
    ("auth", "token"), ("client", "secret"), ("amz", "signature"), ("session", "token"),
    ("security", "token"), ("signing", "key"), ("encryption", "key"), ("master", "key"),
}  # fmt: skip
_CAMEL_RE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _words(key: str) -> list[str]:
    key = _CAMEL_RE.sub("_", key)
    return [w for w in re.split(r"[._\-\s/]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    """True for a name whose value is a secret: ``db_password``, ``db_pass``, ``passphrase``,
    ``private_key``, ``aws.secret_access_key``, ``apiKey``, ``X-Amz-Signature``, ``sig``, ...
    (``max_tokens``, ``tokenizer``, ``keyframe``, ``bypass`` are not)."""
    words = _words(key)
    if any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


# --------------------------------------------------------------------------- secret values

_PEM_RE = re.compile(r"-----BEGIN (?P<kind>[A-Z0-9 ]*PRIVATE KEY)-----.*?-----END (?P=kind)-----", re.DOTALL)
# ``scheme://userinfo@host``: the password may hold ``/`` and ``@`` (the last ``@`` of the token ends it).
_URL_USERINFO_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s'\"<>]*)@"
    r"(?P<host>[A-Za-z0-9.\-_~%]+|\[[0-9A-Fa-f:.]+\])"
)
_PORT_PATH_RE = re.compile(r"^\d{1,5}(/|$)")
# Known token formats, wherever they appear (GitHub, GitLab, Slack, OpenAI-style, Hugging Face, AWS keys).
_TOKEN_RE = re.compile(
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_\-]{20,}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}|sk-[A-Za-z0-9_\-]{20,}|hf_[A-Za-z0-9]{20,}|ASIA[0-9A-Z]{16}"
    r"|AKIA[0-9A-Z]{16})\b"
)
_LOOKS_LIKE_TOKEN_RE = re.compile(r"^(?=.*\d)[A-Za-z0-9_\-.~]{20,}$")
# ``Authorization: Basic abc==`` / ``Proxy-Authorization: Bearer x`` (header lines, curl -H, dicts).
_AUTH_HEADER_RE = re.compile(
    r"(?i)(?P<head>\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:basic|bearer|token|digest|negotiate)\s+)?)"
    r"(?P<val>[^\s\"',;}]+)"
)
_BEARER_RE = re.compile(r"(?i)(?P<head>\bbearer\s+)(?P<val>[A-Za-z0-9\-._~+/]{12,}=*)")
# ``"password": "x"`` / ``'db_pass': 'x'`` (JSON, Python reprs).
_QUOTED_KEY_RE = re.compile(
    r"(?P<q>[\"'])(?P<key>[^\"'\s]{1,80})(?P=q)(?P<sep>\s*:\s*)"
    r"(?P<val>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[^,}\]\s]+)"
)
# ``--password X`` / ``--db-pass=X`` (command lines).
_FLAG_RE = re.compile(
    r"(?P<head>(?<![\w\-])--?(?P<key>[A-Za-z][\w\-.]*)(?:=|\s+))(?P<val>'[^']*'|\"[^\"]*\"|[^\s'\"]+)"
)
# ``key=value`` and ``key: value`` are not matched inside a path (``gt/password.csv: line 14``,
# ``runs/token=abc/gt.csv``): a folder or file name is not a secret, and masking there ate words of the
# message and the path's tail. A key that is a file name (``password.csv``) is not a secret name either.
# ``key=value`` (query strings, DSNs, env assignments, ini files; quoted DSN values included).
_ASSIGN_RE = re.compile(
    r"(?P<head>(?<![\w\-./\\])(?P<key>[A-Za-z_][\w.\-]*)\s*=\s*)"
    r"(?P<val>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^&\s;,'\"]+)"
)
# ``password: x`` (YAML, HTTP-style headers such as ``X-Api-Key: x``).
_COLON_RE = re.compile(r"(?P<head>(?<![\w\-./\\])(?P<key>[A-Za-z_][\w.\-]*):[ \t]+)(?P<val>[^\s,;'\"]+)")
# pgpass: ``hostname:port:database:username:password``.
_PGPASS_RE = re.compile(r"(?m)^(?P<head>[^:\s#]+:(?:\d+|\*):[^:\s]+:[^:\s]+:)(?P<val>\S.*)$")


_AUTH_SCHEMES = ("basic", "bearer", "token", "digest", "negotiate")


def _mask_value(val: str) -> str:
    """``***`` keeping the quotes around a quoted value."""
    if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
        return f"{val[0]}{REDACTED}{val[0]}"
    return REDACTED


def _url_userinfo(m: re.Match) -> str:
    userinfo = m.group("userinfo")
    if "://" in userinfo:  # a second URL inside the token: leave it to its own match
        return m.group(0)
    user, sep, password = userinfo.partition(":")
    if sep:
        if not password or _PORT_PATH_RE.match(password) or password == REDACTED:
            return m.group(0)  # ``host:5000/path@x`` is a port, not a password
        return f"{m.group('scheme')}{user}:{REDACTED}@{m.group('host')}"
    if _LOOKS_LIKE_TOKEN_RE.match(user) or _TOKEN_RE.fullmatch(user):
        return f"{m.group('scheme')}{REDACTED}@{m.group('host')}"  # a token used as the URL user
    return m.group(0)


_FILE_NAME_RE = re.compile(
    r"(?i)\.(?:csv|tsv|txt|h5|hdf5|json|ya?ml|toml|ini|cfg|conf|png|jpe?g|pt|pth|tar|gz|zip|db|sqlite|onnx|"
    r"index|log)$"
)


def _keyed(m: re.Match) -> str:
    val = m.group("val").strip("'\"")
    if _FILE_NAME_RE.search(m.group("key")):
        return m.group(0)
    if not is_secret_key(m.group("key")) or val == REDACTED or val.lower() in _AUTH_SCHEMES:
        return m.group(0)
    head = m.group("head") if "head" in m.groupdict() and m.group("head") is not None else None
    if head is None:
        return f"{m.group('q')}{m.group('key')}{m.group('q')}{m.group('sep')}{_mask_value(m.group('val'))}"
    return f"{head}{_mask_value(m.group('val'))}"


def redact(text: str) -> str:
    """``text`` with every recognisable secret replaced by ``***`` (see the module doc for the forms)."""
    if not text:
        return text
    text = _PEM_RE.sub(
        lambda m: f"-----BEGIN {m.group('kind')}-----{REDACTED}-----END {m.group('kind')}-----", text
    )
    text = _URL_USERINFO_RE.sub(_url_userinfo, text)
    text = _AUTH_HEADER_RE.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    text = _BEARER_RE.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    text = _QUOTED_KEY_RE.sub(_keyed, text)
    text = _FLAG_RE.sub(_keyed, text)
    text = _ASSIGN_RE.sub(_keyed, text)
    text = _COLON_RE.sub(_keyed, text)
    text = _PGPASS_RE.sub(lambda m: f"{m.group('head')}{REDACTED}", text)
    return _TOKEN_RE.sub(REDACTED, text)


def safe_value(key: str, text: str) -> str:
    """The loggable form of ``text`` under ``key``: fully masked for a secret name, else :func:`redact`."""
    return REDACTED if is_secret_key(key) and text else redact(text)


# --------------------------------------------------------------------------- logs


class RedactingFilter(logging.Filter):
    """A handler filter that formats each record once and masks secrets in the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a broken format string: let logging report it as usual
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_FILTER = RedactingFilter()
# Loggers that keep their own handlers (propagate=False) besides the root logger.
_LOGGERS = ("", "mlflow", "isc", "registry", "entrypoints", "optuna")


def install_log_redaction() -> None:
    """Attach :class:`RedactingFilter` to every handler of the root and the project's/MLflow's loggers.

    Handler filters (unlike logger filters) also see records propagated from child loggers such as
    ``isc.driver``; call again after adding handlers (idempotent).
    """
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
