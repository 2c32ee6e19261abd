"""parity: minilora and PEFT side by side, on the same model and the same weights."""
