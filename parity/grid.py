"""What the parity suite runs on: the cases (model x LoRA settings x dtype), and the twin pairs.

A ``Case`` names one configuration. ``Bases`` builds each base model once per (model, dtype,
device) and hands out that one object, so the whole suite shares a single GPT-2. ``make_pair``
turns a base and a case into a ``Pair``: a minilora model and a PEFT model built from the same
seed (``parity.twins.make_twins``), plus one fixed batch of inputs. The checks take a ``Pair``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import minilora
from parity import architectures, twins

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
ATTENTION_ONLY = ("c_attn",)
ALL_LINEAR = ("c_attn", "c_proj", "c_fc")


class LinearNet(nn.Module):
    """A plain nn.Linear model with GPT-2's layer names, so the same target lists apply to it.

    x (B, 32) -> c_attn (B, 96) -> tanh -> c_proj (B, 32) -> c_fc (B, 64) -> tanh -> head (B, 8)
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(3 * width, width)
        self.c_fc = nn.Linear(width, 2 * width)
        self.head = nn.Linear(2 * width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.c_fc(self.c_proj(torch.tanh(self.c_attn(x))))))


@dataclass(frozen=True)
class Case:
    """One configuration: which model, which LoRA numbers, which dtype."""

    model: str = "gpt2"                      # "gpt2" (GPT-2 small), "tiny-gpt2", "linear", or "arch:<name>"
    r: int = 8
    lora_alpha: float = 16
    use_rslora: bool = False
    lora_dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_ONLY
    dtype: str = "float32"
    selector: str = ""                       # "default" (target_modules=None) or "all-linear" instead of targets

    def config(self) -> minilora.LoraConfig:
        targets = {"default": None, "all-linear": "all-linear"}.get(self.selector, list(self.targets))
        return minilora.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora,
                                   lora_dropout=self.lora_dropout, target_modules=targets)

    @property
    def architecture(self) -> Optional[architectures.Architecture]:
        """The tiny architecture of an "arch:<name>" case (parity/architectures.py), else None."""
        return architectures.ARCHITECTURES[self.model[5:]] if self.model.startswith("arch:") else None

    @property
    def label(self) -> str:
        parts = [self.model.removeprefix("arch:"), f"r={self.r}", f"alpha={self.lora_alpha:g}"]
        if self.use_rslora:
            parts.append("rslora")
        if self.lora_dropout:
            parts.append(f"dropout={self.lora_dropout:g}")
        parts += [self.selector or "[" + ",".join(self.targets) + "]", self.dtype]
        return " ".join(parts)


def tiny_gpt2() -> nn.Module:
    """GPT-2's architecture (Conv1D layers, tied embeddings) at a size that runs in milliseconds."""
    return minilora.models.tiny_gpt2(n_embd=64, n_head=4, vocab_size=1000, n_positions=64,
                                     bos_token_id=0, eos_token_id=0).train()


def quick_grid(model_name: Optional[str] = None) -> list[Case]:
    """Seconds: one GPT-2 case (a tiny GPT-2 unless real weights were asked for) and three plain-Linear
    cases that cover dropout, all targets, bfloat16, float64 and rsLoRA."""
    return [
        Case("gpt2" if model_name else "tiny-gpt2", r=8, lora_alpha=16),
        Case("linear", r=8, lora_alpha=16, targets=ALL_LINEAR, lora_dropout=0.1),
        Case("linear", r=4, lora_alpha=8, targets=ALL_LINEAR, dtype="bfloat16"),
        Case("linear", r=64, lora_alpha=16, use_rslora=True, dtype="float64"),
    ]


def full_grid() -> list[Case]:
    """A few minutes on 2 cores: every axis of the issue, varied around r=8 on GPT-2 small (float32,
    float64), and the full product of rank x targets x dtype on the (cheap) plain-Linear model."""
    gpt2 = [
        Case("gpt2", r=8, lora_alpha=16),
        Case("gpt2", r=1, lora_alpha=1),
        Case("gpt2", r=64, lora_alpha=128, targets=ALL_LINEAR),
        Case("gpt2", r=8, lora_alpha=32, use_rslora=True),
        Case("gpt2", r=8, lora_alpha=16, lora_dropout=0.1, targets=ALL_LINEAR),
        Case("gpt2", r=8, lora_alpha=16, dtype="float64"),
        # bfloat16 matmuls are slow on CPUs: GPT-2's layers in bfloat16 on the tiny GPT-2 (4 min -> 1 s)
        Case("tiny-gpt2", r=8, lora_alpha=16, targets=ALL_LINEAR, dtype="bfloat16"),
        Case("tiny-gpt2", r=8, lora_alpha=16),  # the behaviours' GPT-2 (cheap to copy and pickle)
    ]
    linear = [
        Case("linear", r=r, lora_alpha=2 * r, targets=targets, dtype=dtype)
        for r in (1, 8, 64) for targets in (ATTENTION_ONLY, ALL_LINEAR) for dtype in DTYPES
    ]
    linear += [
        Case("linear", r=8, lora_alpha=16, use_rslora=True, targets=ALL_LINEAR),
        Case("linear", r=8, lora_alpha=16, lora_dropout=0.1, targets=ALL_LINEAR),
        Case("linear", r=8, lora_alpha=16, lora_dropout=0.1, targets=ALL_LINEAR, dtype="bfloat16"),
    ]
    return gpt2 + linear


def arch_grid(names: str) -> list[Case]:
    """The architecture axis: each tiny architecture (``"llama,bert"`` or ``"all"``) with PEFT's default
    targets (target_modules=None) and with "all-linear", r=4, dropout 0.1 (so train mode is checked).

    Raises:
        ValueError: for an unknown architecture name (the message lists the known ones).
    """
    return [Case(f"arch:{spec.name}", r=4, lora_alpha=8, lora_dropout=0.1, selector=selector)
            for spec in architectures.resolve(names) for selector in ("default", "all-linear")]


@dataclass
class Bases:
    """Base models built once and shared: one per (model, dtype, device).

    ``model_name`` is what ``minilora.load_model`` gets for "gpt2" (None: the embedded default).
    """

    model_name: Optional[str] = None
    _cache: dict = field(default_factory=dict)

    def get(self, model: str, dtype: str, device: str) -> nn.Module:
        key = (model, dtype, device)
        if key not in self._cache:
            if model == "gpt2":
                float32 = self._cache.get(("gpt2", "float32", device))
                base = copy.deepcopy(float32) if float32 is not None else minilora.load_model(self.model_name)
            elif model == "tiny-gpt2":
                base = tiny_gpt2()
            elif model.startswith("arch:"):
                base = architectures.ARCHITECTURES[model[5:]].build()
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)
                    base = LinearNet()
            self._cache[key] = base.to(device=device, dtype=DTYPES[dtype]).eval()
        return self._cache[key]

    def release_unneeded(self, upcoming: list["Case"]) -> None:
        """Free the bases no upcoming case needs (GPT-2 float32 stays: the other dtypes copy it)."""
        needed = {(case.model, case.dtype) for case in upcoming} | {("gpt2", "float32")}
        for key in list(self._cache):
            if key[:2] not in needed:
                del self._cache[key]


@dataclass
class Pair:
    """A minilora model and a PEFT model with equal adapters, and one batch to feed both."""

    case: Case
    device: str
    mini: nn.Module
    peft: nn.Module
    inputs: torch.Tensor   # token ids (B, T) for GPT-2, features (B, 32) for LinearNet, a dict for an architecture
    targets: torch.Tensor  # next tokens (B, T) for GPT-2, regression targets (B, 8) for LinearNet, None for an
    #                        architecture (its loss is the mean square of the logits)
    base: Optional[nn.Module] = None  # the shared base both were copied from: deep-copy before changing

    @property
    def label(self) -> str:
        return self.case.label


def make_inputs(case: Case, model: nn.Module, device: str, seed: int = 0, batch: int = 2,
                tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A small fixed batch (2 x 8 tokens for GPT-2): small inputs keep the suite fast."""
    if case.architecture is not None:
        return case.architecture.inputs(seed, batch, tokens), None  # a dict of model inputs; no targets
    generator = torch.Generator().manual_seed(seed)
    if case.model != "linear":
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, tokens + 1), generator=generator)
        return ids[:, :-1].to(device), ids[:, 1:].to(device)
    x = torch.randn(batch, 32, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, 8, generator=generator, dtype=torch.float64)
    dtype = DTYPES[case.dtype]
    return x.to(device, dtype), y.to(device, dtype)


def make_pair(bases: Bases, case: Case, device: str, seed: int = 0, random_b: bool = False) -> Pair:
    """Twins for ``case`` on ``device``. ``random_b=False`` keeps the same-seed init (B = 0), which
    the init check compares; ``randomize(pair)`` then gives both sides equal non-zero adapters.

    Raises:
        twins.UnsupportedByPeft: when the installed PEFT cannot express the case.
    """
    base = bases.get(case.model, case.dtype, device)
    mini, peft_model = twins.make_twins(base, case.config(), seed=seed, random_b=random_b)
    inputs, targets = make_inputs(case, base, device, seed)
    return Pair(case, device, mini, peft_model, inputs, targets, base)


def randomize(pair: Pair, seed: int = 0) -> None:
    """Give both sides the same non-zero A and B, so every error in the update shows in outputs."""
    twins.randomize_adapters(pair.mini, seed)
    twins.copy_adapters_to_peft(pair.mini, pair.peft)


def output(model: nn.Module, pair: Pair) -> torch.Tensor:
    """The model's output for the pair's batch: logits (B, T, vocab) or features (B, 8)."""
    if pair.case.architecture is not None:
        return model(**pair.inputs).logits
    if pair.case.model != "linear":
        return model(input_ids=pair.inputs).logits
    return model(pair.inputs)


def loss(model: nn.Module, pair: Pair) -> torch.Tensor:
    """Cross-entropy on next tokens for GPT-2, mean squared error for LinearNet; bfloat16 outputs are
    compared in float32 (the loss of a half-precision model is taken in full precision)."""
    out = output(model, pair)
    if pair.case.architecture is not None:  # any smooth function of all outputs compares gradients
        return out.float().pow(2).mean()
    if pair.case.model != "linear":
        return F.cross_entropy(out.flatten(0, 1).float(), pair.targets.flatten())
    dtype = torch.float32 if out.dtype == torch.bfloat16 else out.dtype
    return F.mse_loss(out.to(dtype), pair.targets.to(dtype))
