"""Regexes that come from files, matched with a time bound.

``target_modules``, ``exclude_modules``, ``layers_pattern``, ``modules_to_save`` and the keys of
``rank_pattern`` / ``alpha_pattern`` are regexes (or are pasted into one), and an adapter file can
carry any string. Python's ``re`` backtracks: a pattern like ``(.+)+X`` can take longer than the age
of the universe on one module name, and ``load_adapter`` / ``minilora merge`` would hang. The
third-party ``regex`` engine (the one transformers' tokenizers use) reads the same syntax, avoids most
such blow-ups outright, and takes a ``timeout``. Inside ``with time_bound():`` (one selection of
target modules) all matches together get ``MATCH_SECONDS``; a single match outside one gets as
much. Then a MiniLoraError.

Validity is still judged by ``re`` (``re.compile`` in targets.py), so a pattern PEFT rejects is
rejected here too.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Iterator, Optional

import regex

from .config import MiniLoraError

MATCH_SECONDS = 2.0

_deadline: contextvars.ContextVar[Optional[float]] = contextvars.ContextVar("minilora_regex_deadline", default=None)


@contextlib.contextmanager
def time_bound(seconds: Optional[float] = None) -> Iterator[None]:
    """All regex matches inside the block share one budget (default ``MATCH_SECONDS``); nested blocks
    keep the outer deadline."""
    if _deadline.get() is not None:
        yield
        return
    token = _deadline.set(time.monotonic() + (MATCH_SECONDS if seconds is None else seconds))
    try:
        yield
    finally:
        _deadline.reset(token)


def fullmatch(pattern: str, name: str) -> bool:
    """``re.fullmatch(pattern, name) is not None``, within the time bound."""
    return _bounded(regex.fullmatch, pattern, name) is not None


def match(pattern: str, name: str) -> Optional["regex.Match"]:
    """``re.match(pattern, name)``, within the time bound."""
    return _bounded(regex.match, pattern, name)


def _bounded(function, pattern: str, name: str):
    deadline = _deadline.get()
    timeout = MATCH_SECONDS if deadline is None else max(deadline - time.monotonic(), 1e-6)
    try:
        return function(pattern, name, timeout=timeout)
    except TimeoutError:
        raise MiniLoraError(
            f"The regex {pattern!r} took more than {MATCH_SECONDS:g} s to match this model's module names "
            "(it backtracks: nested quantifiers such as (.+)+ try exponentially many ways). Nothing was "
            "changed. Simplify the pattern, or list the module names instead."
        ) from None
