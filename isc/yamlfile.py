"""Reading a YAML file of options (a training config, a tuning space): one mapping, or one error line.

Why a module of its own: the training configs and the tuning spaces read their files the same way, and
a file that is not UTF-8 (binary, Latin-1) must be one ``error: config: ...`` line, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from isc.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds (UTF-8, a BOM allowed); :class:`ConfigError` (param ``config``) otherwise."""
    import yaml

    path = Path(path)
    try:
        # utf-8-sig: a BOM is text too. A binary or Latin-1 file was a UnicodeDecodeError traceback.
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError("config", f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                                    f"{exc.start}); save the YAML as UTF-8") from None
    except OSError as exc:
        raise ConfigError("config", f"{path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("config", f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path}: expected a mapping of option: value")
    return data
