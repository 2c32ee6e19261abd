"""A two-minute tour: inject LoRA into GPT-2, count, merge, and check merged == unmerged.

Run: ``python -m minilora.demo`` (the embedded random GPT-2) or ``--model gpt2`` for real weights.
"""

from __future__ import annotations

import argparse

import torch

import minilora


MERGE_TOLERANCE = 1e-4  # float32 logits: W0 + dW is rounded once per weight, then summed over 12 blocks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minilora.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="hub name (if cached) or local directory (default: embedded random GPT-2 small)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default: 8)")
    parser.add_argument("--alpha", type=float, default=32, help="lora_alpha; the update is scaled by alpha / r (default: 32)")
    args = parser.parse_args(argv)
    try:
        config = minilora.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.1,
                                     init_lora_weights=False)  # random B, so the update is visible
        print("loading the model ...", flush=True)
        model = minilora.load_model(args.model)
        torch.manual_seed(0)
        minilora.inject(model, config).eval()
    except minilora.MiniLoraError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")

    print(model.transformer.h[0].attn, "\n")
    print(minilora.layer_table(model), "\n")
    minilora.print_trainable_parameters(model)

    tokens = torch.randint(0, model.config.vocab_size, (2, 16))  # (B, T)
    with torch.no_grad():
        adapted = model(tokens).logits
        with minilora.disabled(model):
            base = model(tokens).logits
        minilora.merge(model)
        merged = model(tokens).logits
    diff = (merged - adapted).abs().max().item()
    print(f"\nadapter changes the logits by up to   {(adapted - base).abs().max():.3e}")
    print(f"merged vs unmerged logits, max |diff|: {diff:.3e} "
          f"({'equal' if diff <= MERGE_TOLERANCE else 'NOT equal'} within {MERGE_TOLERANCE:g})")
    if not diff <= MERGE_TOLERANCE:  # (a NaN difference too)
        parser.exit(1, "merged and unmerged outputs differ: this is a bug in minilora\n")


if __name__ == "__main__":
    main()
