"""A two-minute tour: inject LoRA into GPT-2, count, merge, and check merged == unmerged.

Run: ``python -m minilora.demo`` (the embedded random GPT-2) or ``--model gpt2`` for real weights.
"""

from __future__ import annotations

import argparse

import torch

import minilora


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub name or local path (default: embedded random GPT-2)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=32)
    args = parser.parse_args(argv)

    model = minilora.load_model(args.model)
    torch.manual_seed(0)
    config = minilora.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.1,
                                 init_lora_weights=False)  # random B, so the update is visible
    minilora.inject(model, config).eval()
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
    print(f"\nadapter changes the logits by up to   {(adapted - base).abs().max():.3e}")
    print(f"merged vs unmerged logits, max |diff|: {(merged - adapted).abs().max():.3e}")


if __name__ == "__main__":
    main()
