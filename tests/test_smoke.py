"""The headline fact, end to end: r=8 on GPT-2's c_attn trains 294,912 of 124,734,720 parameters."""

import minilora


def test_gpt2_default_targets_count(gpt2):
    minilora.inject(gpt2, minilora.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1))
    trainable, total = minilora.count_parameters(gpt2)
    assert (trainable, total) == (12 * 8 * (768 + 2304), 124_439_808 + 294_912)
    assert minilora.trainable_parameters_line(gpt2) == (
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    )
