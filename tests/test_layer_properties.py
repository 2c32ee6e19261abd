"""Property tests of LoraLinear: the invariants of LoRA, checked over many shapes, ranks and dtypes.

Every expected value comes from an independent float64 computation of the formula
``h = W0 x + b + scaling * B A x`` (never from minilora itself), except where an exact identity
holds (disabled or B = 0 must give the base layer's output bit for bit).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

import minilora
from conftest import DEVICES
from minilora import LoraLinear, MiniLoraError
from parity.twins import max_abs_diff

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS = ["Linear", "Conv1D"]

# The one tolerance table. A check passes when max |got - want| <= RTOL[dtype] * scale, with
# `scale` the largest magnitude involved (max |want|, or max |W0| + max |dW| for weights).
# Why a few eps: the two sides of each check round differently. A merged layer rounds W0 + dW to
# the dtype once per weight; an unmerged one rounds W0 x and B A x separately; matmuls sum in
# different orders. Each rounding costs at most half an ulp (eps / 2) of the value it touches, and
# only a few of them stack up on one output. 8 eps covers that with room to spare, and is far
# below the O(1) error of a real bug (a wrong scaling, a missing transpose, a dropped term).
# In bfloat16 (eps = 2^-7) that is 6%: half-precision cases check the dtype plumbing; the float32
# and float64 cases (8 eps = 1e-6 and 2e-15) check the math.
RTOL = {dtype: 8 * torch.finfo(dtype).eps for dtype in DTYPES}


@dataclass
class Case:
    """One LoraLinear to test: a base layer's kind, shape and dtype, and the adapter's numbers."""

    kind: str
    dtype: torch.dtype
    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    use_rslora: bool
    bias: bool
    cast_adapters: bool   # True: layer.to(dtype) afterwards (half adapters); False: PEFT's default
    seed: int

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def cases(kind: str, dtype: torch.dtype):
    return st.builds(
        Case,
        kind=st.just(kind),
        dtype=st.just(dtype),
        in_features=st.integers(1, 24),
        out_features=st.integers(1, 24),
        r=st.integers(1, 8),
        lora_alpha=st.sampled_from([1, 2.5, 8, 16, 64]),
        use_rslora=st.booleans(),
        bias=st.booleans(),
        cast_adapters=st.booleans(),
        seed=st.integers(0, 2**16),
    )


def build(case: Case) -> LoraLinear:
    """A LoraLinear with random W0, b, A and B (init_lora_weights=False: the update is not zero)."""
    generator = torch.Generator().manual_seed(case.seed)
    if case.kind == "Linear":
        base = nn.Linear(case.in_features, case.out_features, bias=case.bias)
        weight_shape = (case.out_features, case.in_features)  # nn.Linear: (out, in)
    else:
        base = Conv1D(case.out_features, case.in_features)    # Conv1D(nf=out, nx=in): weight (in, out)
        weight_shape = (case.in_features, case.out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(weight_shape, generator=generator) / math.sqrt(case.in_features))
        if base.bias is not None:
            base.bias.copy_(torch.randn(case.out_features, generator=generator) * 0.1)
    base.to(case.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        layer = LoraLinear(base, r=case.r, lora_alpha=case.lora_alpha, use_rslora=case.use_rslora,
                           init_lora_weights=False)
    if case.cast_adapters:
        layer.to(case.dtype)
    return layer


def inputs(case: Case) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case.seed + 1)
    return torch.randn(3, 2, case.in_features, generator=generator).to(case.dtype)  # (B, T, in)


def reference_delta(layer: LoraLinear, case: Case) -> torch.Tensor:
    """scaling * B A in float64, in the base weight's layout: (out, in) Linear, (in, out) Conv1D."""
    delta = case.scaling * (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double())  # (out, r) @ (r, in)
    return delta.T if case.kind == "Conv1D" else delta


def reference_output(layer: LoraLinear, case: Case, x: torch.Tensor) -> torch.Tensor:
    """h = x W^T + b + x dW^T, all in float64, from the layer's current (unmerged) weights."""
    weight = layer.base_layer.weight.double()
    delta = reference_delta(layer, case)
    if case.kind == "Conv1D":
        weight, delta = weight.T, delta.T                    # to (out, in)
    out = x.double() @ (weight + delta).T                    # (B, T, in) @ (in, out) -> (B, T, out)
    if layer.base_layer.bias is not None:
        out = out + layer.base_layer.bias.double()
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float, what: str) -> None:
    diff = max_abs_diff(got, want)
    bound = RTOL[dtype] * max(scale, 1e-30)
    assert diff <= bound, f"{what}: max |diff| = {diff:.3e} > {bound:.3e} ({dtype})"


layer_params = pytest.mark.parametrize("kind", KINDS)
dtype_params = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))


# ------------------------------------------------------------------------------------------------
# The adapter's dtype and layout
# ------------------------------------------------------------------------------------------------
@layer_params
@dtype_params
def test_adapter_dtype_follows_peft_default(kind, dtype):
    """PEFT's default (autocast_adapter_dtype=True): float32 adapters on half bases, else the base dtype."""
    layer = build(Case(kind, dtype, 6, 5, 2, 8, False, True, cast_adapters=False, seed=0))
    expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == expected
    assert layer.lora_A["default"].weight.shape == (2, 6) and layer.lora_B["default"].weight.shape == (5, 2)  # (r, in), (out, r)
    assert layer.fan_in_fan_out == (kind == "Conv1D")
    assert layer.base_layer.weight.dtype == dtype


@layer_params
@dtype_params
@settings(max_examples=6)
@given(data=st.data())
def test_delta_weight_is_scaled_product(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = build(case)
    got = layer.delta_weight()
    want = reference_delta(layer, case)
    assert got.shape == layer.base_layer.weight.shape
    assert got.dtype == layer.lora_B["default"].weight.dtype
    assert_close(got, want, got.dtype, want.abs().max().item(), "delta_weight vs float64 scaling * B @ A")


# ------------------------------------------------------------------------------------------------
# Forward: against the float64 formula, and merged == unmerged
# ------------------------------------------------------------------------------------------------
@layer_params
@dtype_params
@settings(max_examples=6)
@given(data=st.data())
def test_forward_matches_formula_and_merged_forward(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = build(case)
    x = inputs(case)
    want = reference_output(layer, case, x)
    scale = want.abs().max().item()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
    assert layer.merged
    assert unmerged.dtype == merged.dtype == dtype
    assert_close(unmerged, want, dtype, scale, "unmerged forward vs float64 formula")
    assert_close(merged, want, dtype, scale, "merged forward vs float64 formula")
    assert_close(merged, unmerged, dtype, scale, "merged vs unmerged forward")


@layer_params
@dtype_params
@settings(max_examples=6)
@given(data=st.data())
def test_merge_then_unmerge_restores_w0(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = build(case)
    w0 = layer.base_layer.weight.detach().clone()
    delta = reference_delta(layer, case)
    layer.merge()
    assert_close(layer.base_layer.weight, w0.double() + delta, dtype,
                 w0.abs().max().item() + delta.abs().max().item(), "merged W0 vs float64 W0 + dW")
    layer.unmerge()
    assert not layer.merged
    assert layer.base_layer.weight.dtype == dtype
    assert_close(layer.base_layer.weight, w0, dtype,
                 w0.abs().max().item() + delta.abs().max().item(), "W0 after merge + unmerge")


# ------------------------------------------------------------------------------------------------
# Exact identities: disabled, and B = 0
# ------------------------------------------------------------------------------------------------
@layer_params
@dtype_params
@settings(max_examples=5)
@given(data=st.data())
def test_disabled_gives_base_output_bitwise(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = build(case)
    model = nn.Sequential(layer)
    x = inputs(case)
    with torch.no_grad():
        base = layer.base_layer(x)
        adapted = model(x)
        with minilora.disabled(model):
            assert layer.disabled
            off = model(x)
        again = model(x)
    assert torch.equal(off, base)
    assert not layer.disabled
    assert torch.equal(again, adapted)
    assert not torch.equal(adapted, base), "the random adapter should change the output"


@layer_params
@dtype_params
@settings(max_examples=5)
@given(data=st.data())
def test_zero_b_gives_base_output_bitwise(kind, dtype, data):
    case = data.draw(cases(kind, dtype))
    layer = build(case)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
    x = inputs(case)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("init", [True, "gaussian"])
@layer_params
def test_fresh_adapter_has_zero_b_and_gives_base_output(kind, init):
    """init_lora_weights True / "gaussian": B = 0, so B A = 0 and training starts from the base model."""
    case = Case(kind, torch.float32, 7, 5, 3, 16, False, True, cast_adapters=False, seed=3)
    base = build(case).base_layer
    layer = LoraLinear(base, r=3, lora_alpha=16, init_lora_weights=init)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) == layer.lora_A["default"].weight.numel()
    x = inputs(case)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


@layer_params
def test_disabled_restores_state_after_an_exception(kind):
    layer = build(Case(kind, torch.float32, 4, 4, 2, 8, False, True, False, seed=1))
    model = nn.Sequential(layer)
    with pytest.raises(RuntimeError, match="inside"):
        with minilora.disabled(model):
            raise RuntimeError("inside")
    assert not layer.disabled


# ------------------------------------------------------------------------------------------------
# Merge bookkeeping: repeated calls, safe merge
# ------------------------------------------------------------------------------------------------
@layer_params
@dtype_params
def test_repeated_merge_or_unmerge_warns_and_does_nothing(kind, dtype):
    """PEFT's warnings, word for word (peft 0.21.2 tuners_utils.check_adapters_to_merge, lora.Linear.unmerge)."""
    layer = build(Case(kind, dtype, 9, 6, 4, 8, False, True, False, seed=2))
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged

    layer.merge()
    merged = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do."):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged) and layer.merged

    layer.unmerge()
    after = layer.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, after) and not layer.merged


@layer_params
@dtype_params
def test_safe_merge_matches_plain_merge(kind, dtype):
    """safe=True only adds a check: the merged weight is the one a plain merge writes, up to one rounding."""
    case = Case(kind, dtype, 9, 6, 4, 8, False, True, False, seed=4)
    safe, plain = build(case), build(case)
    safe.merge(safe=True)
    plain.merge()
    assert safe.merged
    scale = plain.base_layer.weight.abs().max().item()
    assert_close(safe.base_layer.weight, plain.base_layer.weight, dtype, scale, "safe vs plain merge")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@layer_params
@dtype_params
def test_safe_merge_refuses_non_finite_and_leaves_w0(kind, dtype, bad):
    layer = build(Case(kind, dtype, 5, 7, 2, 8, False, True, False, seed=5))
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = bad
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(MiniLoraError, match="NaN or inf"):
        layer.merge(safe=True)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


def test_model_level_safe_merge_merges_nothing_when_one_layer_is_broken():
    """minilora.merge(model, safe=True) checks every layer before changing any."""
    first = build(Case("Linear", torch.float32, 4, 4, 2, 8, False, True, False, seed=6))
    second = build(Case("Conv1D", torch.float32, 4, 4, 2, 8, False, True, False, seed=7))
    with torch.no_grad():
        second.lora_B["default"].weight[0, 0] = float("nan")
    model = nn.Sequential(first, second)
    weights = [layer.base_layer.weight.detach().clone() for layer in (first, second)]
    with pytest.raises(MiniLoraError, match="NaN or inf"):
        minilora.merge(model, safe=True)
    for layer, w0 in zip((first, second), weights):
        assert torch.equal(layer.base_layer.weight, w0) and not layer.merged
    with pytest.raises(MiniLoraError, match="NaN or inf"):
        minilora.merge_and_unload(model, safe=True)
    assert all(isinstance(m, LoraLinear) for m in model)
    for layer, w0 in zip((first, second), weights):
        assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


# ------------------------------------------------------------------------------------------------
# The rest of LoraLinear's contract
# ------------------------------------------------------------------------------------------------
@layer_params
def test_wraps_the_base_layer_without_copying(kind):
    layer = build(Case(kind, torch.float32, 4, 3, 2, 8, False, True, False, seed=8))
    base = layer.base_layer
    assert isinstance(base, nn.Linear if kind == "Linear" else Conv1D)
    again = LoraLinear(base, r=2)
    assert again.base_layer is base
    assert again.base_layer.weight is base.weight


@layer_params
def test_repr_shows_base_layer_r_alpha_scaling_and_merged(kind):
    layer = build(Case(kind, torch.float32, 4, 3, 2, 16, True, True, False, seed=9))
    text = repr(layer)
    assert kind in text  # the base layer's own repr
    assert "r=2" in text and "lora_alpha=16" in text
    assert f"scaling={16 / math.sqrt(2):g}" in text
    assert "merged=False" in text
    layer.merge()
    assert "merged=True" in repr(layer)


@pytest.mark.parametrize("use_rslora, expected", [(False, 32 / 4), (True, 32 / 2)])
def test_scaling_is_alpha_over_r_or_over_sqrt_r(use_rslora, expected):
    layer = LoraLinear(nn.Linear(3, 3), r=4, lora_alpha=32, use_rslora=use_rslora)
    config = minilora.LoraConfig(r=4, lora_alpha=32, use_rslora=use_rslora)
    assert layer.scaling["default"] == config.scaling == expected


def test_dropout_applies_to_the_adapter_input_only():
    """With dropout, train mode: h = W0 x + b + scaling * B A dropout(x); W0 x sees the whole x."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False).train()
    x = torch.randn(5, 16)
    torch.manual_seed(123)
    got = layer(x)
    torch.manual_seed(123)
    mask_x = nn.functional.dropout(x, p=0.5, training=True)  # the same draw from the same RNG state
    adapter_B, adapter_A = layer.lora_B["default"], layer.lora_A["default"]
    want = layer.base_layer(x) + adapter_B(adapter_A(mask_x)) * layer.scaling["default"]
    assert torch.equal(got, want)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(x)
        assert torch.equal(eval_out, layer.base_layer(x) + adapter_B(adapter_A(x)) * layer.scaling["default"])
    assert isinstance(LoraLinear(nn.Linear(2, 2), lora_dropout=0.0).lora_dropout["default"], nn.Identity)


@pytest.mark.parametrize("device", DEVICES)
@layer_params
def test_adapters_live_on_the_base_layers_device(kind, device):
    base = nn.Linear(4, 3) if kind == "Linear" else Conv1D(3, 4)
    layer = LoraLinear(base.to(device), r=2, init_lora_weights=False)
    assert layer.lora_A["default"].weight.device.type == layer.lora_B["default"].weight.device.type == torch.device(device).type
    x = torch.randn(2, 4, device=device)
    with torch.no_grad():
        assert layer(x).device.type == torch.device(device).type


@layer_params
def test_adapters_follow_a_base_layer_on_another_device(kind):
    """The meta device stands in for an accelerator here: A and B go where W0 is, not to the default device."""
    base = (nn.Linear(4, 3) if kind == "Linear" else Conv1D(3, 4)).to("meta")
    layer = LoraLinear(base, r=2)
    assert layer.lora_A["default"].weight.is_meta and layer.lora_B["default"].weight.is_meta


@pytest.mark.parametrize("device", DEVICES)
def test_model_to_moves_and_casts_adapters(device):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    minilora.inject(model, minilora.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    model.to(device=device, dtype=torch.float64)
    for _, layer in minilora.lora_layers(model):
        for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.weight):
            assert weight.dtype == torch.float64
            assert weight.device.type == torch.device(device).type
    x = torch.randn(3, 4, dtype=torch.float64, device=device)
    with torch.no_grad():
        assert model(x).dtype == torch.float64


def test_half_input_to_float32_adapter_returns_the_base_dtype():
    """On a half base the adapter (float32) computes in float32; the output keeps the base's dtype."""
    for dtype in (torch.float16, torch.bfloat16):
        layer = build(Case("Linear", dtype, 6, 4, 2, 8, False, True, cast_adapters=False, seed=10))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = layer(inputs(Case("Linear", dtype, 6, 4, 2, 8, False, True, False, seed=10)))
        assert out.dtype == dtype
