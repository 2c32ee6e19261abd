"""Segment lockstep: every variant's call cut at its transformer blocks, and the pieces interleaved.

A quiet 2-core VM still runs 30% slower now and then, in bursts of 0.1-2 s (its host's other
tenants: it is user CPU time, not page faults or waiting). A call of GPT-2 small (a prefill of
1 x 128 takes ~330 ms) is long enough for a burst to hit one variant's call and miss the next,
which is why a ratio of two whole calls swings by ~8% from round to round even with the
reference bracketing every variant.

So each variant's round runs in a thread of its own, and a baton passes between the threads at
the model's **block boundaries**: a forward pre-hook on every repeated block (the longest
``nn.ModuleList`` of same-type modules: GPT-2's 12 ``GPT2Block``), a gradient hook on every
block's input (the backward's boundaries: the CPU autograd engine runs a call's backward in the
calling thread), and the end of every step. Variant a's block k runs, then b's block k, then c's,
then a's block k + 1, ... (in the rotating order of timing.round_order), so every variant's work
lies in the same windows of ~25 ms and a burst slows all of them alike. Each segment is timed in
its own thread: ``time.thread_time`` (the thread's CPU time: with one torch thread the matmuls run
in the calling thread) when torch runs one thread, the process's CPU time otherwise (only one
variant's thread runs at a time), and ``perf_counter`` for wall time; a variant's time for the
round is the sum of its segments.

The price: every block starts with caches that the other variants' blocks have emptied. For a
call at one token (decode) that is what every token already paid in step lockstep; for a prefill
of 1 x 128 it raised PEFT's ratio to base from 1.06 to 1.13 (paths that write output-sized
temporaries lose their warm caches), and at decode the LoRA paths' ratios by up to ~1%, so the
benchmark uses segments only where asked (``--segment-lockstep``; plan.SEGMENTS_NOTE).

The hooks act only in a thread that runs a timed segment (``_local.variant``): calls made
elsewhere (validation, profiling) pass straight through them, and they change no result (a hook
returns nothing). ``Boundaries`` removes them on exit. A torch.compile'd model gets none (a hook
would enter its graph): its calls are one segment each, as are models without repeated blocks.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable

import torch
from torch import nn

_local = threading.local()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: its longest ``nn.ModuleList`` whose modules are all of one type
    ([] for a torch.compile'd model or a model with no such list)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return []
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) \
                and len({type(child) for child in module}) == 1:
            best = list(module)
    return best


def cut_points(model: nn.Module) -> list[nn.Module]:
    """The modules a call is cut before: the repeated blocks, then the output layer (GPT-2's lm_head:
    at 1 x 128 tokens its 768 x 50257 matmul is as long as four blocks)."""
    points = blocks(model)
    if points and hasattr(model, "get_output_embeddings"):
        output = model.get_output_embeddings()
        if isinstance(output, nn.Module) and all(output is not p for p in points):
            points.append(output)
    return points


def boundary() -> None:
    """A segment boundary: in a timed variant's thread, end this segment and wait for the baton;
    anywhere else, nothing."""
    variant = getattr(_local, "variant", None)
    if variant is not None:
        variant.boundary()


def _before_block(module, args, kwargs) -> None:
    variant = getattr(_local, "variant", None)
    if variant is None:
        return
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(_after_block_backward)  # fires once this block's backward is done
    variant.boundary()


def _after_block_backward(grad: torch.Tensor) -> None:
    boundary()


class Boundaries:
    """``with Boundaries(models):`` the hooks on every model's cut points (each module once), removed on exit."""

    def __init__(self, models: Iterable[nn.Module]):
        self.handles, seen = [], set()
        for model in models:
            for block in cut_points(model):
                if id(block) not in seen:
                    seen.add(id(block))
                    self.handles.append(block.register_forward_pre_hook(_before_block, with_kwargs=True))

    def __enter__(self) -> "Boundaries":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def cpu_clock() -> tuple[float, float]:
    """(CPU seconds, wall seconds) now, as a segment thread reads them (see the module docstring; the
    benchmark runs segments with one torch thread only, where thread time is the call's work)."""
    cpu = time.thread_time() if torch.get_num_threads() == 1 else time.process_time()
    return cpu, time.perf_counter()


class _Variant:
    """A variant's thread, kept for a whole measurement (so that each variant keeps its own malloc
    arena and nothing is created per round); ``start(steps)`` gives it a round, ``next_segment``
    runs that round's next segment."""

    def __init__(self, clock: Callable[[], tuple[float, float]]):
        self.clock, self.steps = clock, None
        self.segments: list[tuple[float, float]] = []
        self.finished, self.error = True, None
        self._turn, self._yielded = threading.Semaphore(0), threading.Semaphore(0)
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        _local.variant = self
        while True:
            self._turn.acquire()
            if self.steps is None:  # stop()
                return
            try:
                self._started = self.clock()
                for i, step in enumerate(self.steps):
                    if i:
                        self.boundary()
                    step()
                self._end_segment()
            except BaseException as error:  # re-raised in the timing thread
                self.error = error
            finally:
                self.steps, self.finished = None, True
                self._yielded.release()

    def _end_segment(self) -> None:
        now = self.clock()
        self.segments.append((now[0] - self._started[0], now[1] - self._started[1]))

    def boundary(self) -> None:
        self._end_segment()
        self._yielded.release()   # the baton back to the timing thread ...
        self._turn.acquire()      # ... until this variant's next turn
        self._started = self.clock()

    def start(self, steps: list[Callable[[], object]]) -> None:
        self.steps, self.segments, self.finished, self.error = list(steps), [], False, None

    def next_segment(self) -> None:
        self._turn.release()
        self._yielded.acquire()

    def stop(self) -> None:
        self.steps = None
        self._turn.release()
        self.thread.join()


class Threads:
    """``with Threads(names) as threads:`` one thread per variant for a measurement's rounds
    (``segment_round(..., threads=threads)``), stopped on exit."""

    def __init__(self, names: Iterable[str], clock: Callable[[], tuple[float, float]] = None):
        self.variants = {name: _Variant(clock or cpu_clock) for name in names}

    def __enter__(self) -> "Threads":
        return self

    def __exit__(self, *exc) -> None:
        for variant in self.variants.values():
            variant.stop()


def segment_round(steps: dict[str, list[Callable[[], object]]], order: Callable[[int], list[str]],
                  clock: Callable[[], tuple[float, float]] = cpu_clock,
                  threads: Threads | None = None) -> dict[str, list[tuple[float, float]]]:
    """Run one round of every variant's steps in segment lockstep: {name: [(cpu, wall) per segment]}.

    ``order(j)``: the order of the variants for the j-th segment. A variant with fewer segments
    (a compiled model) is simply done earlier. An error in a variant is raised here. ``threads``:
    the variants' threads (``Threads``, whose clock is used); without it, threads for this round only.
    """
    if threads is None:
        with Threads(steps, clock) as own:
            return segment_round(steps, order, threads=own)
    variants = {name: threads.variants[name] for name in steps}
    for name, variant in variants.items():
        variant.start(steps[name])
    j = 0
    try:
        while not all(v.finished for v in variants.values()):
            for name in order(j):
                if not variants[name].finished:
                    variants[name].next_segment()
            j += 1
    finally:
        for variant in variants.values():  # a variant stopped by another's error still waits: end it
            while not variant.finished:
                variant.next_segment()
    for name, variant in variants.items():
        if variant.error is not None:
            raise RuntimeError(f"{name} failed while timed") from variant.error
    return {name: v.segments for name, v in variants.items()}
