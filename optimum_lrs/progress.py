"""One switch for the package's progress bars, so that a `--quiet` command line silences all of them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_enabled = True


def set_progress_bars(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def progress(iterable: Iterable[T], **kwargs: Any) -> Iterable[T]:
    """tqdm over `iterable`: shown on a terminal unless switched off (tqdm hides it elsewhere)."""
    disable = kwargs.pop("disable", None)  # None: shown on a terminal
    return tqdm(iterable, disable=disable if _enabled else True, **kwargs)
