"""Errors the platform raises for bad input. Each names the file or parameter at fault."""

from __future__ import annotations

from pathlib import Path

SHOWN_CHARS = 200  # longest value echoed in an error line: a YAML alias bomb once printed 522 KB of it


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` as text for an error message, cut to ``limit`` characters. A list or mapping is described,
    never expanded: str() of nested YAML aliases builds the whole tree (10**7 leaves from a 1 KB file)."""
    if isinstance(value, (list, tuple, set, dict)):
        kind = "mapping" if isinstance(value, dict) else "list"
        return f"a {kind} of {len(value)} item(s)"
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class ISCError(Exception):
    """Base class: the CLI prints these as one clean ``error:`` line and exits with status 2."""


class ConfigError(ISCError, ValueError):
    """A bad parameter value. The message names the parameter."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


class BadImageError(ISCError):
    """An image file that cannot be decoded (zero-byte, truncated, not an image, too large...)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class BadImagesError(ISCError):
    """Several bad images found in one pass (extraction lists them all before stopping)."""

    def __init__(self, errors: list[BadImageError]):
        self.errors = errors
        listing = "\n".join(f"  {e.path}: {e.reason}" for e in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{len(errors)} unreadable image(s):\n{listing}{more}")


class DescriptorFileError(ISCError):
    """A descriptor or ground-truth file that violates the ISC21 format."""

    def __init__(self, path: str | Path, message: str):
        self.path = Path(path)
        super().__init__(f"{path}: {message}")


class TrackingUnavailableError(ISCError):
    """The MLflow tracking server cannot be reached."""
