"""Segment lockstep (benchmarks/segments.py), untimed: a planted clock and planted slow bursts.

- the pieces interleave: block k of every variant runs before block k + 1 of any;
- a planted machine that runs 30% slower in bursts: segment lockstep finds the A/A control at
  1.00 and a planted 10% slower variant at 1.10 where whole calls (bracketed) scatter;
- the hooks change nothing (logits, a training step's weights, bitwise) and are removed after;
- the backward is cut too (the CPU autograd engine runs it in the calling thread);
- a variant that raises is reported, and no thread is left waiting.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from benchmarks.segments import Boundaries, blocks, cut_points, segment_round
from benchmarks.stats import half_width
from benchmarks.timing import interleaved, round_order, run_once, summarize
from benchmarks.variants import adapter_weights, build_variant, load_base, lora_config
from benchmarks.workloads import Decode, Prefill, TrainStep
from benchmarks.plan import ALL_LINEAR


class Machine:
    """A planted machine: work advances the running thread's CPU clock by cost x the speed *now*;
    the speed is 1.3x slower during bursts of ``burst`` units out of every ``period`` (global time)."""

    def __init__(self, burst: float = 9.0, period: float = 23.0):
        self.now, self.burst, self.period = 0.0, burst, period
        self.local, self.log = threading.local(), []

    def work(self, name: str, block: int, cost: float) -> None:
        slow = 1.3 if self.now % self.period < self.burst else 1.0
        self.now += cost * slow
        self.local.cpu = getattr(self.local, "cpu", 0.0) + cost * slow
        self.log.append((name, block))

    def clock(self) -> tuple[float, float]:
        cpu = getattr(self.local, "cpu", 0.0)
        return cpu, cpu

    def measure(self, fn):  # the whole-call timer of timing.interleaved
        before = self.clock()[0]
        fn()
        spent = self.clock()[0] - before
        return spent, spent


class Block(nn.Module):
    def __init__(self, machine: Machine, name: str, index: int, cost: float):
        super().__init__()
        self.machine, self.name, self.index, self.cost = machine, name, index, cost

    def forward(self, x):
        self.machine.work(self.name, self.index, self.cost)
        return x


class Toy(nn.Module):
    """12 blocks of ``cost`` units each (a planted GPT-2)."""

    def __init__(self, machine: Machine, name: str, cost: float, n: int = 12):
        super().__init__()
        self.h = nn.ModuleList(Block(machine, name, i, cost) for i in range(n))
        self.other = nn.ModuleList([nn.Identity(), nn.ReLU()])  # shorter, mixed types: not the blocks

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return x


def planted_variants(machine: Machine) -> dict[str, Toy]:
    return {"base": Toy(machine, "base", 1.0), "base-copy": Toy(machine, "base-copy", 1.0),
            "slow": Toy(machine, "slow", 1.1)}


def test_blocks_are_the_longest_list_of_one_module_type():
    machine = Machine()
    toy = Toy(machine, "t", 1.0)
    assert blocks(toy) == list(toy.h)
    gpt2 = load_base("tiny", "cpu")
    assert blocks(gpt2) == list(gpt2.transformer.h)
    assert cut_points(gpt2) == list(gpt2.transformer.h) + [gpt2.lm_head]
    config = lora_config(ALL_LINEAR, 4, 0.0, 2.0)
    peft = build_variant("peft", gpt2, config, adapter_weights(gpt2, config, seed=0))
    assert [type(b).__name__ for b in blocks(peft)] == ["GPT2Block"] * 2
    assert blocks(torch.compile(gpt2)) == []  # a compiled model's calls stay whole: a hook would enter its graph


def test_segments_interleave_block_by_block_and_a_round_is_their_sum():
    machine = Machine(burst=0.0)  # no bursts: every block costs exactly its cost
    models = planted_variants(machine)
    functions = {name: (lambda m: lambda: m(0))(m) for name, m in models.items()}
    with Boundaries(models.values()) as hooks:
        assert len(hooks.handles) == 3 * 12
        timed = interleaved(functions, "cpu", "base", min_rounds=2, max_rounds=2, max_seconds=60,
                            segments=True, clock=machine.clock)
    assert all(not block._forward_pre_hooks for m in models.values() for block in m.h)  # removed
    assert timed["lockstep"] == "segments" and not timed["bracketed"]
    assert timed["segments"] == {"base": 13, "base-copy": 13, "slow": 13}  # a cut before each of 12 blocks
    names = list(models)
    first_round = machine.log[:36]
    assert first_round == [(name, k) for k in range(12) for name in round_order(names, k + 1)]  # segment 0: up to block 0
    summary = summarize(timed, "base")
    assert summary["slow"]["cpu"]["samples_s"] == pytest.approx([13.2, 13.2])
    assert summary["slow"]["cpu"]["ratio"] == pytest.approx(1.1)
    assert summary["base-copy"]["cpu"]["ratio"] == pytest.approx(1.0)


def test_segment_lockstep_resolves_what_bursts_scatter_across_whole_calls():
    """The same planted bursts, timed both ways for 30 rounds: whole calls (bracketed by base) put a
    burst on one variant's call and not the next; segments put it on every variant's same blocks."""
    results = {}
    for segments in (False, True):
        machine = Machine()
        models = planted_variants(machine)
        functions = {name: (lambda m: lambda: m(0))(m) for name, m in models.items()}
        with Boundaries(models.values() if segments else []):
            timed = interleaved(functions, "cpu", "base", min_rounds=30, max_rounds=30, max_seconds=60,
                                timer=(("cpu", "wall"), machine.measure), segments=segments, clock=machine.clock)
        results[segments] = summarize(timed, "base")
    whole, cut = results[False], results[True]
    width = {k: {n: half_width(s[n]["cpu"]["ratio"], s[n]["cpu"]["low"], s[n]["cpu"]["high"])
                 for n in ("base-copy", "slow")} for k, s in (("whole", whole), ("cut", cut))}
    assert width["whole"]["base-copy"] > 0.05           # whole calls: the bursts scatter the A/A control
    for name in ("base-copy", "slow"):                  # segments: 3x narrower at least (here 1-2.5% vs 8-9%)
        assert width["cut"][name] < width["whole"][name] / 3
    assert cut["base-copy"]["cpu"]["ratio"] == pytest.approx(1.0, abs=1e-9)
    assert cut["slow"]["cpu"]["ratio"] == pytest.approx(1.1, abs=1e-9)   # the planted slow variant, found


@pytest.fixture(scope="module")
def tiny_variants():
    base = load_base("tiny", "cpu")
    config = lora_config(ALL_LINEAR, 4, 0.1, 2.0)
    weights = adapter_weights(base, config, seed=0)
    return base, {name: build_variant(name, base, config, weights) for name in ("base", "peft", "fused")}


def test_hooks_change_no_logits_and_every_workload_is_cut_at_its_blocks(tiny_variants):
    base, models = tiny_variants
    vocab = base.config.vocab_size
    prefill, decode = Prefill(2, 8, vocab, "cpu"), Decode(3, 3, vocab, "cpu")
    expected = {name: (prefill.check(m), decode.check(m)) for name, m in models.items()}
    with Boundaries(models.values()):
        for name, m in models.items():  # outside a timed thread the hooks do nothing
            assert torch.equal(prefill.check(m), expected[name][0])
        seen = {}

        def recording(name, m):
            def run():
                with torch.no_grad():  # grad mode is per thread: set in the variant's own
                    seen[name] = m(input_ids=prefill.ids).logits
            return run
        counts = segment_round({n: [recording(n, m)] for n, m in models.items()}, lambda j: list(models))
        assert {n: len(s) for n, s in counts.items()} == {n: 4 for n in models}  # cut before 2 blocks and lm_head
        for name in models:
            assert torch.equal(seen[name], expected[name][0])
        steps = segment_round({n: decode.prepare(m).start() for n, m in models.items()}, lambda j: list(models))
        assert {n: len(s) for n, s in steps.items()} == {n: 4 * 4 for n in models}  # prompt + 3 tokens, 4 each
    for name, m in models.items():  # hooks removed, the model as before
        assert all(not b._forward_pre_hooks for b in cut_points(m))
        assert all(torch.equal(a, b) for a, b in zip(decode.check(m), expected[name][1], strict=True))


def test_a_training_step_cut_into_segments_trains_exactly_as_one_call(tiny_variants):
    """Forward and backward are both cut (the backward at each block's input gradient, in the
    calling thread), and the weights after the step equal those of the same step run whole."""
    import copy

    base, models = tiny_variants
    step = TrainStep(2, 8, base.config.vocab_size, "cpu", 0.1)
    for name in ("peft", "fused"):
        whole, cut = copy.deepcopy(models[name]), copy.deepcopy(models[name])
        torch.manual_seed(5)
        run_once(step.prepare(whole))
        with Boundaries([cut]):
            torch.manual_seed(5)
            segments = segment_round({name: step.prepare(cut).start()}, lambda j: [name])
        # forward: | block 0 | block 1 | lm_head | then backward: | lm_head's input gradient (the loss and
        # lm_head done) | block 1's input gradient | the rest and AdamW (block 0's input needs no gradient)
        assert len(segments[name]) == 7
        for (n, a), (_, b) in zip(whole.named_parameters(), cut.named_parameters()):
            assert torch.equal(a, b), n


def test_a_variant_that_raises_is_reported_and_no_thread_is_left_waiting():
    machine = Machine(burst=0.0)
    models = planted_variants(machine)

    def broken():
        models["slow"](0)
        raise ValueError("planted")
    before = threading.active_count()
    with Boundaries(models.values()):
        with pytest.raises(RuntimeError, match="slow failed while timed") as error:
            segment_round({"base": [lambda: models["base"](0)], "slow": [broken]}, lambda j: ["base", "slow"],
                          clock=machine.clock)
    assert isinstance(error.value.__cause__, ValueError)
    assert threading.active_count() == before
