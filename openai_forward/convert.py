"""``aifd convert`` (SPEC §9). Not built yet."""

from __future__ import annotations


def convert(log_folder: str | None = None, target_path: str | None = None) -> None:
    raise ValueError("aifd convert is not available yet")
