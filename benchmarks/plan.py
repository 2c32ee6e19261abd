"""What to measure: the grid of cases, workloads and variants, and how many rounds to time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COMPILED_NOTE = (
    "torch.compile, measured once by hand (GPT-2 small, r=8 on all targets, torch 2.13 CPU, 2 shared "
    "cores): prefill 4 x 128 compiles in about 40 s and is timed in the run. Decode (32 tokens) took "
    "213 s the first time (compiling, and recompiling as the KV cache grows) and 16.9 s the second, "
    "against 2.3 s eager. A training step (batch 2 x 64) took 197 s to compile, then 9.8 s against "
    "about 10 s eager. Both are left out of the run to keep it within 15 minutes "
    "(Plan.compiled_decode, Plan.compiled_train).")

ATTN_ONLY = ("c_attn",)
ALL_LINEAR = ("c_attn", "c_proj", "c_fc")

# Inference variants, in table order. "base" is the model without LoRA; the peft-* variants are
# PEFT 0.21's lora.Linear unmerged and merged (merge_adapter); the rest are minilora's paths
# ("fused-addmm": the fused path with concatenate=False).
INFERENCE_VARIANTS = ("base", "peft", "peft-merged", "reference", "merged", "fused", "fused-addmm", "compiled")
# Training variants (merged weights cannot train; base has nothing to train). Ratios are to "peft".
TRAINING_VARIANTS = ("peft", "reference", "fused", "compiled")


@dataclass
class Plan:
    """The benchmark grid.

    ``rounds`` is adaptive: each measurement gets as many interleaved rounds as fit in
    ``seconds_per_measurement`` (``main_case_seconds`` for the main case), judged from the
    validation call's time, at least ``min_rounds`` and at most ``max_rounds``.
    """

    model: str = "gpt2"                         # "gpt2": the embedded GPT-2 small; "tiny": 2 layers, 32 wide
    targets: tuple = (ATTN_ONLY, ALL_LINEAR)
    ranks: tuple = (8, 64)
    lora_alpha_per_r: float = 2.0               # lora_alpha = 2 r: the scale does not change the cost
    prefill_shapes: tuple = ((1, 32), (4, 128))  # (batch, sequence)
    decode_prompt: int = 8
    decode_tokens: int = 32
    train_shape: tuple = (1, 64)                # (batch, sequence) of a training step
    dropouts: tuple = (0.0, 0.1)
    inference_variants: tuple = INFERENCE_VARIANTS
    training_variants: tuple = TRAINING_VARIANTS
    main_case: tuple = (ALL_LINEAR, 8)           # the case the targets, memory and profile runs use
    # The other cases (r=64, c_attn only) get a smaller grid so that the run fits 10-15 minutes on
    # 2 cores: the largest prefill shape, decode and training, for these variants only.
    other_case_variants: tuple = ("base", "peft", "reference", "fused", "fused-addmm")
    compiled_where: str = "main"                # "main": torch.compile only on the main case's largest
                                                # prefill and dropout-0 training (compiling costs about a
                                                # minute per graph on 2 cores); "all": everywhere
    compiled_decode: bool = False               # decode recompiles as the KV cache grows: on this 2-core
                                                # CPU the first 32 tokens took 213 s, the next 32 took 7x
                                                # eager's time (see COMPILED_NOTE)
    compiled_train: bool = False                # compiling forward + backward took 197 s (COMPILED_NOTE)
    min_rounds: int = 3
    max_rounds: int = 15
    seconds_per_measurement: float = 12.0
    main_case_seconds: float = 50.0             # the main case gets more rounds: its numbers are the targets
    warmup: int = 0                             # extra untimed calls; the validation call always warms up
    memory: bool = True
    profile: bool = True
    seed: int = 0
    threads: int = 0                            # torch threads; 0: torch's default (memory children use it too)
    notes: list = field(default_factory=lambda: [COMPILED_NOTE])

    def cases(self) -> list[tuple[tuple, int]]:
        """(targets, r) pairs, main case first so that the headline numbers come early."""
        cases = [(tuple(t), r) for t in self.targets for r in self.ranks]
        main = (tuple(self.main_case[0]), self.main_case[1])
        return [main] + [case for case in cases if case != main] if main in cases else cases

    def to_json(self) -> dict:
        return asdict(self)


def full_plan() -> Plan:
    """The committed run: about 10-15 minutes on a quiet 2-core CPU."""
    return Plan()


def quick_plan() -> Plan:
    """Well under a minute: the main case, small shapes, five variants, no compile, memory or profile."""
    return Plan(targets=(ALL_LINEAR,), ranks=(8,), prefill_shapes=((1, 32),), decode_tokens=4,
                train_shape=(1, 32), dropouts=(0.1,),
                inference_variants=("base", "peft", "reference", "merged", "fused"),
                training_variants=("peft", "reference", "fused"),
                min_rounds=3, max_rounds=3, seconds_per_measurement=0.0, main_case_seconds=0.0,
                memory=False, profile=False)


def tiny_plan() -> Plan:
    """For the tests: a 2-layer GPT-2, every variant and workload, seconds in all."""
    return Plan(model="tiny", ranks=(4,), main_case=(ALL_LINEAR, 4), prefill_shapes=((2, 8), (1, 5)),
                decode_prompt=3, decode_tokens=3, train_shape=(2, 8), min_rounds=2, max_rounds=2,
                seconds_per_measurement=0.0, main_case_seconds=0.0, memory=False, profile=False)
