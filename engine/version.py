"""The installed StudioNOVA version, as outputs' metadata and reports record it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def app_version() -> str:
    try:
        return version("studionova")
    except PackageNotFoundError:
        return "0.1.0"
