"""What produced a run: package versions and the UTC time, written into every run record."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _metadata
import platform

PACKAGES = ("fvg", "torch", "diffusers", "transformers", "peft", "accelerate")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_timestamp() -> str:
    """Now in UTC, ISO 8601 to the second (e.g. 2026-01-31T12:00:00+00:00)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
