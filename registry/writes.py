"""The one writer of registry state that two promotions (or a promotion and an export) can write at once.

Why: MLflow's SQL store writes an alias, a model-version tag or a registered-model tag by reading the row
and then INSERTing it when it read none. Two processes doing that at once both read none, and the second
INSERT fails with a UNIQUE constraint (SQLite: ``UNIQUE constraint failed``; PostgreSQL: ``duplicate key
value violates unique constraint``), which the server answers as a 400 the client does not retry. The row
exists by then, so the right answer depends on what it holds: when it already holds the value this writer
meant to write, someone else just did our work and the write has succeeded; otherwise the write is retried
(now an UPDATE: the last writer wins, as without the race).

Every call of ``set_registered_model_alias``, ``delete_registered_model_alias``, ``set_model_version_tag``,
``set_registered_model_tag`` and ``update_model_version`` in the project goes through :class:`RegistryWriter`
(``tests/test_registry_writes.py`` greps for direct calls). Promotion records are appended under keys no
other writer can pick (:meth:`RegistryWriter.append_record`), so a concurrent record is never overwritten.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from isc.errors import ISCError

log = logging.getLogger(__name__)

# Messages of the store errors that mean "another writer touched this row at the same moment". SQLite's
# "database is locked" is also answered by the server as retryable; the others come back as 400s.
_CONFLICT_MARKS = (
    "unique constraint",
    "duplicate key",
    "integrityerror",
    "database is locked",
    "could not serialize access",
    "deadlock detected",
)


def is_conflict(exc: BaseException) -> bool:
    """True when ``exc`` is a store's complaint about a concurrent write (not a bad request of ours)."""
    text = str(exc).lower()
    return any(mark in text for mark in _CONFLICT_MARKS)


class RegistryWriter:
    """Writes to the model registry that are correct under concurrent writers (module doc).

    ``attempts`` bounds the retries of one write; between them the writer sleeps ``pause * attempt`` seconds
    with jitter, so racers spread out instead of colliding again.
    """

    def __init__(self, client: Any, attempts: int = 8, pause: float = 0.1) -> None:
        self.client = client
        self.attempts = attempts
        self.pause = pause

    # -- the one retry rule -------------------------------------------------------------------------------
    def _write(self, what: str, write: Callable[[], None], done: Callable[[], bool]) -> None:
        """Run ``write``; on a concurrent-write conflict, succeed if ``done()`` (the row holds our value),
        else retry. Any other error is raised as it is."""
        for attempt in range(1, self.attempts + 1):
            try:
                write()
                return
            except Exception as exc:  # noqa: BLE001 - MlflowException or a driver error, both classified below
                if not is_conflict(exc):
                    raise
                try:
                    if done():
                        log.debug("%s: written concurrently with the same value; taken as done", what)
                        return
                except Exception as check_exc:  # noqa: BLE001 - the read-back itself may race; retry the write
                    log.debug("%s: read-back after a conflict failed (%s); retrying", what, check_exc)
                if attempt == self.attempts:
                    raise ISCError(f"registry write '{what}' still conflicted with concurrent writers after "
                                   f"{self.attempts} attempts: {exc}") from exc
                log.debug("%s: concurrent write conflict (%s); retry %d", what, exc, attempt)
                time.sleep(self.pause * attempt * (0.5 + random.random()))

    # -- aliases ------------------------------------------------------------------------------------------
    def _alias_is(self, name: str, alias: str, version: str | None) -> bool:
        try:
            current = str(self.client.get_model_version_by_alias(name, alias).version)
        except Exception:  # noqa: BLE001 - MLflow raises when the alias is unset
            current = None
        return current == version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        version = str(version)
        self._write(f"{name}@{alias} -> v{version}",
                    lambda: self.client.set_registered_model_alias(name, alias, version),
                    lambda: self._alias_is(name, alias, version))

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``@alias``; an alias someone else removed first counts as removed."""
        if self._alias_is(name, alias, None):
            return
        self._write(f"{name}@{alias} removed",
                    lambda: self.client.delete_registered_model_alias(name, alias),
                    lambda: self._alias_is(name, alias, None))

    # -- tags and descriptions ----------------------------------------------------------------------------
    def set_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        version = str(version)
        self._write(f"{name} v{version} tag {key}",
                    lambda: self.client.set_model_version_tag(name, version, key, value),
                    lambda: self.client.get_model_version(name, version).tags.get(key) == value)

    def set_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.set_version_tag(name, version, key, value)

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._write(f"{name} tag {key}",
                    lambda: self.client.set_registered_model_tag(name, key, value),
                    lambda: self.client.get_registered_model(name).tags.get(key) == value)

    def set_version_description(self, name: str, version: str, description: str) -> None:
        version = str(version)
        self._write(f"{name} v{version} description",
                    lambda: self.client.update_model_version(name, version, description=description),
                    lambda: (self.client.get_model_version(name, version).description or "") == description)

    def append_record(self, name: str, prefix: str, entry: dict[str, Any]) -> str:
        """Append ``entry`` (JSON) as registered-model tag ``<prefix><UTC time>-<random>``; return the key.

        The key is this writer's alone (microsecond time + 32 random bits) and sorts in time order, so two
        promoters appending at once each keep their record: a count-based key (``NNNN``) would let the
        second overwrite the first without any error (the store UPDATEs a row it finds).
        """
        now = datetime.now(timezone.utc)
        key = f"{prefix}{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}"
        entry = {"time": now.isoformat(timespec="seconds"), **entry}
        self.set_model_tag(name, key, json.dumps(entry, sort_keys=True))
        return key


def records(client: Any, name: str, prefix: str) -> list[dict[str, Any]]:
    """The JSON records appended under ``prefix`` on registered model ``name``, oldest first."""
    tags = client.get_registered_model(name).tags
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(prefix)]
