"""What to measure: the cases, workloads and variants, the threads, and when to stop timing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COMPILED_NOTE = (
    "torch.compile: prefill is compiled and timed in the run (its compile time is in the torch.compile "
    "table). Decode and the training step are not: measured once by hand (GPT-2 small, r=8 on all "
    "targets, torch 2.13 CPU, 2 shared cores), decode (32 tokens) took 213 s the first time (it recompiles "
    "as the KV cache grows) and then 7x eager's time; a training step took 197 s to compile, then about "
    "eager's time (Plan.compiled_decode, Plan.compiled_train turn them on).")

NOT_COMPILED_NOTE = "torch.compile: not in this run (--no-compiled, or --variants without compiled)."

SEGMENTS_NOTE = (
    "Segment lockstep (each call cut at its blocks, the pieces of all variants interleaved; "
    "benchmarks/segments.py) is off by default (--segment-lockstep turns it on per workload). Measured "
    "against the default method in alternate rounds it narrowed every interval 2-3x in the same seconds, but "
    "moved ratios: at prefill PEFT 1.130 and the reference 1.099 x base where whole calls gave 1.061 and "
    "1.074, at decode PEFT, the reference and fused ~1% higher (1.107 / 1.094, 1.110 / 1.100, 1.019 / "
    "1.011) in one run, equal in another: each block starts with caches that the other variants' blocks "
    "emptied, which a model running alone does not pay.")

REPLACEMENT_NOTE = (
    "Re-placement: two identical copies of GPT-2 small decode a few % apart for as long as they live (where "
    "their weights' pages landed: measured in one process, four deep copies ran 0.974-1.015x each other, the "
    "same order when measured again, another order once copied anew). So in the one-thread inference tables "
    "every variant's model (not the compiled one) is deep-copied anew every few rounds, untimed and warmed "
    "up, and the placement becomes noise inside the interval instead of an offset in the ratio.")

ATTN_ONLY = ("c_attn",)
ALL_LINEAR = ("c_attn", "c_proj", "c_fc")

# Inference variants, in table order. "base" is the model without LoRA and "base-copy" an identical
# copy of it (the A/A control); the peft-* variants are PEFT 0.21's lora.Linear unmerged and merged
# (merge_adapter); the rest are minilora's paths ("fused-addmm": the fused path with
# concatenate=False; "compiled": torch.compile of the reference path).
INFERENCE_VARIANTS = ("base", "base-copy", "peft", "peft-merged", "reference", "merged", "fused", "fused-addmm",
                      "compiled")
# Training variants (merged weights cannot train; base has nothing to train). Ratios are to "peft";
# "peft-copy" is the A/A control.
TRAINING_VARIANTS = ("peft", "peft-copy", "reference", "fused", "compiled")


@dataclass
class Plan:
    """The benchmark grid and the stopping rule.

    Timing: interleaved rounds (benchmarks/timing.py) until every variant's 95% interval of the
    median ratio is within +-``resolution``, with at least ``min_rounds`` and at most ``max_rounds``
    rounds or ``max_seconds`` of rounds (``other_max_seconds`` for the cases other than the main
    one) per measurement.
    """

    model: str = "gpt2"                          # "gpt2": the embedded GPT-2 small; "tiny": 2 layers, 32 wide
    main_case: tuple = (ALL_LINEAR, 8)           # (targets, r): the targets are judged on this case
    other_cases: tuple = ()                      # (targets, r) pairs: prefill and decode, fewer variants
    lora_alpha_per_r: float = 2.0                # lora_alpha = 2 r: the scale does not change the cost
    prefill_shapes: tuple = ((1, 128),)         # (batch, sequence); the first is the targets' shape
    prefill: bool = True                         # time prefill (--sections)
    decode: bool = True                          # time the per-token decode loop (--sections)
    decode_prompt: int = 8
    decode_tokens: int = 16
    generate: bool = True                        # also time model.generate (decode with transformers' overhead)
    train_shape: tuple = (1, 64)                 # (batch, sequence) of a training step
    dropouts: tuple = (0.0, 0.1)
    inference_variants: tuple = INFERENCE_VARIANTS
    training_variants: tuple = TRAINING_VARIANTS
    other_case_variants: tuple = ("base", "base-copy", "peft", "reference", "merged", "fused", "fused-addmm")
    compiled_decode: bool = False                # see COMPILED_NOTE
    compiled_train: bool = False
    threads: int = 1                             # torch threads for the ratio tables (0: torch's default)
    all_cores: bool = True                       # also the main case's prefill and decode with every core
    all_cores_variants: tuple = ("base", "base-copy", "peft", "fused")  # (the same validated models)
    mixed_adapters: tuple = (1, 4, 16)          # several adapters in one batch (row i: adapter i mod n)
    mixed_variants: tuple = ("merged", "peft-mixed", "minilora-mixed", "gathered")  # ratios to "merged"
    mixed_batch: int = 16                       # rows; prefill (mixed_batch, mixed_seq), decode mixed_tokens
    mixed_seq: int = 8
    mixed_tokens: int = 4
    mixed_min_rounds: int = 6                   # the fewest that give a 95% interval (stats.MIN_ROUNDS)
    min_rounds: int = 10
    max_rounds: int = 400
    max_seconds: float = 240.0                   # per measurement, main case, one thread
    train_max_seconds: float | None = None       # per training measurement, main case (None: max_seconds)
    other_max_seconds: float = 30.0              # per measurement: other cases, all cores, mixed batches
    resolution: float = 0.01                     # stop when every interval is within +-1% of its median
    segments: bool = True                        # CPU, one thread: segment lockstep (benchmarks/segments.py) ...
    segment_workloads: tuple = ()                # ... for these workloads: none by default (SEGMENTS_NOTE)
    bracket: bool = True                         # without segments, one-call workloads: the reference around each
    replace_every: int = 4                       # one-thread inference tables: every variant's model copied anew
                                                 # every this many rounds (0: never; REPLACEMENT_NOTE says why)
    memory: bool = True
    profile: bool = True
    layer_call: bool = True                      # one tiny layer's call, each way: the per-call overhead
    seed: int = 0
    notes: list = field(default_factory=list)    # extra notes for the page (run_notes adds torch.compile's)

    def run_notes(self) -> list[str]:
        """The page's notes: what torch.compile did in this run (as it ran), then ``notes``."""
        compiled = "compiled" in self.inference_variants and self.prefill
        segments = f"This run: segment lockstep for {', '.join(self.segment_workloads)}." \
            if self.segments and self.segment_workloads else "This run: no segment lockstep."
        replacement = f"This run: every {self.replace_every} rounds." if self.replace_every else "This run: never."
        return [COMPILED_NOTE if compiled else NOT_COMPILED_NOTE, f"{SEGMENTS_NOTE} {segments}",
                f"{REPLACEMENT_NOTE} {replacement}"] + list(self.notes)

    def cases(self) -> list[tuple[tuple, int]]:
        """(targets, r) pairs, main case first so that the targets are measured early."""
        main = (tuple(self.main_case[0]), self.main_case[1])
        return [main] + [(tuple(t), r) for t, r in self.other_cases if (tuple(t), r) != main]

    def to_json(self) -> dict:
        return asdict(self)


def full_plan() -> Plan:
    """The committed run: at most ~30 minutes on a quiet 2-core CPU (5 main-case sections of at most
    240 s of rounds, 8 others of at most 30 s, ~5 min of building, validating, compiling, memory
    and profiles); less where the sections resolve to +-1% before their cap."""
    return Plan()


def quick_plan() -> Plan:
    """Well under a minute: the main case, small shapes, six variants, no compile, memory or profile."""
    return Plan(other_cases=(), prefill_shapes=((1, 32),), decode_tokens=4, train_shape=(1, 32), dropouts=(0.1,),
                mixed_adapters=(4,), mixed_batch=4, mixed_seq=8, mixed_tokens=2, mixed_min_rounds=3,
                inference_variants=("base", "base-copy", "peft", "reference", "merged", "fused"),
                training_variants=("peft", "peft-copy", "reference", "fused"), all_cores=False,
                min_rounds=3, max_rounds=3, max_seconds=0.0, memory=False, profile=False, layer_call=False)


def tiny_plan() -> Plan:
    """For the tests: a 2-layer GPT-2, every variant and workload but torch.compile, two rounds."""
    return Plan(model="tiny", main_case=(ALL_LINEAR, 4), other_cases=((ATTN_ONLY, 4),),
                prefill_shapes=((2, 8), (1, 5)), decode_prompt=3, decode_tokens=3, train_shape=(2, 8),
                mixed_adapters=(1, 3), mixed_batch=4, mixed_seq=5, mixed_tokens=2, mixed_min_rounds=2,
                inference_variants=tuple(v for v in INFERENCE_VARIANTS if v != "compiled"),
                training_variants=tuple(v for v in TRAINING_VARIANTS if v != "compiled"),
                segment_workloads=("decode", "generate"),  # both timing paths run in the tests
                replace_every=1,  # copies made anew after the first round (one-thread inference tables)
                min_rounds=2, max_rounds=2, max_seconds=0.0, other_max_seconds=0.0, all_cores=True,
                memory=False, profile=False, layer_call=False)
