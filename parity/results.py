"""One row of the parity report: what was compared, the number measured, and the verdict.

Every check returns a list of ``Result`` rows, so the tests, the CLI and the version matrix all read
the same thing. A tolerance of 0.0 means "bitwise equal"; ``None`` means the row is a measurement
with no threshold (the message says what was seen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Union

PASS, FAIL, SKIP, NOT_APPLICABLE = "PASS", "FAIL", "SKIP", "N/A"
STATUSES = (PASS, FAIL, SKIP, NOT_APPLICABLE)

Number = Union[float, int, str, None]

# The checks, in the order they run, with the one line that --help prints for each.
CHECKS = {
    "targets": "the layers wrapped are PEFT's (architecture cases: default targets and all-linear), or both refuse",
    "counts": "trainable / total parameters equal PEFT's count, and each layer adds r*(in+out)",
    "init": "same seed -> the same A and B as peft.get_peft_model, bitwise",
    "forward": "outputs with equal non-zero adapters, in eval mode and in train mode (same dropout RNG)",
    "backward": "gradients of every lora_A / lora_B after one backward pass of the same loss",
    "training": "A and B after a few AdamW steps on the same batches",
    "merge": "merged outputs and merge_and_unload weights vs PEFT's, module types restored, unmerge residual",
    "files": "minilora.save_adapter output loads in PEFT, PEFT's save_pretrained loads in minilora; same outputs",
    "generate": "greedy generate(): the same tokens and per-step scores as PEFT (models that generate)",
    "behaviours": "PEFT's pitfalls and silent wrong answers measured (double wrap; torch.save of a whole model; merged "
                  "state dict; \"false\" strings; tied lm_head merge) next to minilora's answer",
    "adapters": "several adapters (small models): add_adapter init, two active, weighted cat/linear/svd, mixed "
                "batch, merge_adapter/unmerge_adapter, several-adapter files both ways",
}
KNOWN_DEVICES = ("cpu", "cuda")


@dataclass
class Result:
    """One compared quantity.

    Attributes:
        check: which check produced it ("forward", "merge", ...).
        configuration: the case, e.g. ``"gpt2 r=8 alpha=16 [c_attn] float32"``.
        device: "cpu" or "cuda".
        metric: what ``value`` is, e.g. "max abs err (eval logits)".
        value: the measured number (or a short word for behaviours).
        tolerance: the largest value that passes; 0.0 = bitwise; None = no threshold.
        status: PASS, FAIL, SKIP (could not run here) or N/A (does not apply to this case/version).
        message: what a reader needs: the worst tensor, the reason for a SKIP, what PEFT did.
    """

    check: str
    configuration: str
    device: str
    metric: str
    value: Number
    tolerance: Optional[float]
    status: str
    message: str = ""

    def __post_init__(self) -> None:
        assert self.status in STATUSES, self.status

    def to_dict(self) -> dict:
        return asdict(self)


def within(check: str, configuration: str, device: str, metric: str, value: float, tolerance: float,
           message: str = "") -> Result:
    """PASS when ``value <= tolerance`` (a NaN value always fails)."""
    ok = value == value and value <= tolerance  # value == value is False for NaN
    if not ok:
        bound = "bitwise equality" if tolerance == 0 else f"tolerance {tolerance:.1e}"
        message = f"{metric} = {value:.3e} exceeds {bound}" + (f"; {message}" if message else "")
    return Result(check, configuration, device, metric, value, tolerance, PASS if ok else FAIL, message)


def skipped(check: str, configuration: str, device: str, reason: str) -> Result:
    return Result(check, configuration, device, "-", None, None, SKIP, reason)


def not_applicable(check: str, configuration: str, device: str, reason: str) -> Result:
    return Result(check, configuration, device, "-", None, None, NOT_APPLICABLE, reason)
