"""Regexes that come from files, matched with a time bound.

``target_modules``, ``exclude_modules``, ``layers_pattern``, ``modules_to_save`` and the keys of
``rank_pattern`` / ``alpha_pattern`` are regexes (or are pasted into one), and an adapter file can
carry any string. Python's ``re`` backtracks: a pattern like ``(.+)+X`` can take longer than the age
of the universe on one module name, and ``load_adapter`` / ``minilora merge`` would hang. The
third-party ``regex`` engine (the one transformers' tokenizers use) reads the same syntax, avoids most
such blow-ups outright, and takes a ``timeout``. Inside ``with time_bound():`` (one selection of
target modules) all matches together get ``MATCH_SECONDS``; a single match outside one gets as
much. Then a MiniLoraError.

The time bound covers matching, not compiling: ``regex`` unrolls counted repeats when it compiles, so
``a{1000000000}`` would take tens of gigabytes before the first match. A pattern that unrolls to more
than ``MAX_PATTERN_SIZE`` positions (``_unrolled_size``, measured on ``re``'s parse of it) and more
than ``BLOWUP`` times its own length is refused before it is compiled; so is any pattern of more than
``MAX_PLAIN_SIZE`` positions. A long plain regex (a full-name alternation over an MoE's experts) reads.

Validity is still judged by ``re`` (``compile_error``, also before each match), so a pattern PEFT
rejects is rejected here too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import time
from typing import Iterator, Optional

import regex

from .config import MiniLoraError

MATCH_SECONDS = 2.0
# Positions a pattern that repeats may unroll to: about 26 MB compiled, and 5 times a regex that lists every
# linear module of an 80-layer model by its full name (~20,000 characters)
MAX_PATTERN_SIZE = 100_000
# A pattern unrolling to at most BLOWUP positions per character repeats little (a plain one, literals and
# alternatives, unrolls to at most its length): it may reach MAX_PLAIN_SIZE positions (and as many characters),
# about 700 MB and 20 s to compile (measured: 340 bytes, ~10 us a position), 1.6 times a regex naming every expert
# projection of a 61-layer, 256-expert MoE by full name (2.2 million characters, 1.25 million positions)
BLOWUP = 4
MAX_PLAIN_SIZE = 2_000_000

try:  # re's own parser (Python 3.11+), sre_parse before
    from re import _parser as _re_parser
except ImportError:  # pragma: no cover
    import sre_parse as _re_parser  # type: ignore[no-redef]

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
    return _bounded("fullmatch", pattern, name) is not None


def match(pattern: str, name: str) -> Optional["regex.Match"]:
    """``re.match(pattern, name)``, within the time bound."""
    return _bounded("match", pattern, name)


def _bounded(function: str, pattern: str, name: str):
    start = time.monotonic()
    compiled = _compiled(pattern)  # (outside the time bound: its cost is bounded by the size limits)
    deadline = _deadline.get()
    if deadline is not None:  # the shared budget is for matching: the block's deadline moves by the compile time
        deadline += time.monotonic() - start
        _deadline.set(deadline)
    timeout = MATCH_SECONDS if deadline is None else max(deadline - time.monotonic(), 1e-6)
    try:
        return getattr(compiled, function)(name, timeout=timeout)
    except TimeoutError:
        raise MiniLoraError(
            f"The regex {short(pattern)} took more than {MATCH_SECONDS:g} s to match this model's module names "
            "(it backtracks: nested quantifiers such as (.+)+ try exponentially many ways). Nothing was "
            "changed. Simplify the pattern, or list the module names instead."
        ) from None


def compile_error(pattern: str) -> str | None:
    """Why Python's ``re`` (PEFT's engine) cannot compile ``pattern``, or None if it can. A pattern nested
    thousands of groups deep exhausts the recursion limit rather than raising re.error: that is an answer too."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        return str(error) if isinstance(error, re.error) else f"{type(error).__name__}: {error}"
    return None


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> "regex.Pattern":
    """``pattern`` compiled by ``regex`` once its size is checked (a long full-name alternation takes seconds
    to compile, and its matches then take microseconds)."""
    _check_size(pattern)
    return regex.compile(pattern)


def _check_size(pattern: str) -> None:
    """Raise MiniLoraError if ``pattern`` is not one ``re`` reads (PEFT matches with ``re``), or unrolls to
    more than MAX_PATTERN_SIZE positions and BLOWUP times its length (its repeats blow it up), or to more
    than MAX_PLAIN_SIZE."""
    if len(pattern) > MAX_PLAIN_SIZE:  # (before parsing: re's parse of it takes ~100 bytes a character)
        _refuse_plain(pattern, len(pattern))
    try:
        size = _unrolled_size(_re_parser.parse(pattern))
    except (re.error, RecursionError, OverflowError) as error:
        _refuse_invalid(pattern, f"{type(error).__name__}: {error}")
    if size > MAX_PLAIN_SIZE and size <= BLOWUP * len(pattern):
        _refuse_plain(pattern, size)
    if size > MAX_PATTERN_SIZE and size > BLOWUP * len(pattern):
        raise MiniLoraError(
            f"The regex {short(pattern)} repeats so much that it unrolls to about {size:.3g} positions (counted "
            f"repeats such as {{1000}} multiply), more than the {MAX_PATTERN_SIZE} any list of module names needs; "
            "compiling it would take gigabytes. Nothing was changed. Use * or + for an open repeat, or list the "
            "module names instead."
        )
    error = compile_error(pattern)  # what only re's compile step finds (a look-behind of varying width): the
    if error:                       # regex module would accept it, where PEFT fails
        _refuse_invalid(pattern, error)


def _refuse_invalid(pattern: str, error: str) -> None:
    raise MiniLoraError(f"The regex {short(pattern)} is not a valid regex for Python's re, which PEFT matches "
                        f"with ({error}). Fix the pattern, or list the module names instead.") from None


def _refuse_plain(pattern: str, size: int) -> None:
    raise MiniLoraError(
        f"The regex {short(pattern)} is about {size:.3g} positions long, more than the {MAX_PLAIN_SIZE} minilora "
        "compiles (about 700 MB); nothing was changed. List the module names (target_modules as a list), or match "
        "them with a shorter pattern (\\d+ for the layer and expert numbers).")


def _unrolled_size(parsed) -> int:
    """How many positions a parsed pattern unrolls to: each counted repeat multiplies what it repeats by its
    bound (its minimum, for an open one such as ``{3,}``); groups, alternatives and lookarounds add up."""
    size = 0
    for op, value in parsed:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, item = value
            size += max(low if high == _re_parser.MAXREPEAT else high, 1) * _unrolled_size(item)
        elif name == "SUBPATTERN":  # (group, add_flags, del_flags, pattern)
            size += _unrolled_size(value[-1])
        elif name in ("ASSERT", "ASSERT_NOT"):  # (direction, pattern)
            size += _unrolled_size(value[1])
        elif name == "ATOMIC_GROUP":
            size += _unrolled_size(value)
        elif name == "BRANCH":  # (None, [alternatives])
            size += sum(_unrolled_size(part) for part in value[1])
        elif name == "GROUPREF_EXISTS":  # (group, yes, no or None)
            size += sum(_unrolled_size(part) for part in value[1:] if part is not None)
        else:
            size += 1
    return size


def short(pattern: str, limit: int = 80) -> str:
    return repr(pattern) if len(pattern) <= limit else f"{pattern[:limit]!r}... ({len(pattern)} characters)"
