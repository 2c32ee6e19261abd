"""A small text to fine-tune on, and a tokenizer that works offline.

GPT-2's own tokenizer (a byte-level BPE with 50,257 tokens) comes from the Hugging Face hub, which
this project cannot reach. The embedded random GPT-2 does not care which ids it is fed as long as
they are below 50,257, so ``load_tokenizer()`` trains a small byte-level BPE -- GPT-2's algorithm,
with 512 tokens instead of 50,257 -- on ``SAMPLE_TEXT`` in a fraction of a second. With real weights
(``load_tokenizer("gpt2")`` or a local directory) you get the model's own tokenizer, because the ids
must then mean what the embeddings learned.

Both are ``transformers`` tokenizers, so the code that uses them is the same either way.
"""

from __future__ import annotations

import torch

VOCAB_SIZE = 512
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token

SAMPLE_TEXT = """\
A large language model has many weight matrices, and fine-tuning all of them is expensive.
Low-rank adaptation, or LoRA, keeps every pretrained weight frozen and learns a small update instead.
For a frozen weight W0 of shape out by in, LoRA learns two thin matrices: A of shape r by in,
and B of shape out by r. The layer then computes W0 x plus alpha over r times B A x.
The rank r is small, often eight, so A and B hold r times in plus out numbers, not in times out.
B starts at zero, so before training the adapted model gives exactly the base model's outputs.
Only A and B receive gradients; the optimizer never touches W0.
After training, the update B A can be added into W0 once, and the model is plain again.
A merged model runs as fast as the original, because it has the same layers and the same shapes.
The update can also be kept apart, saved in a small file, and loaded onto a fresh copy of the base model.
One base model can then carry many small adapters, one for each task.
In GPT-2 the attention block projects each token to queries, keys and values with one layer, c_attn.
That layer maps 768 numbers to 2304 numbers, three blocks of 768 for the query, the key and the value.
GPT-2 stores this weight as in by out, not out by in, so the update must be transposed before merging.
With rank eight on c_attn in all twelve blocks, LoRA trains 294,912 numbers out of about 124 million.
That is less than a quarter of one percent of the model, and still enough to teach it a new task.
The scale alpha over r keeps the size of the update steady when the rank changes.
Dropout on the adapter's input regularizes the update without touching the frozen path.
"""


def train_tokenizer(text: str = SAMPLE_TEXT, vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``text``, wrapped as a ``PreTrainedTokenizerFast``.

    Byte-level: every string can be encoded (the 256 byte values are the base alphabet); BPE then
    merges the most frequent neighbouring pairs until ``vocab_size`` tokens exist. Training is
    deterministic: the same text gives the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer for ``minilora.load_model(name_or_path)``.

    None or "default": the offline BPE above (the embedded model has random weights, so any ids
    below its vocabulary size will do). Otherwise ``AutoTokenizer.from_pretrained(name_or_path)``.
    """
    from .models import DEFAULT_MODEL

    if name_or_path in (None, DEFAULT_MODEL):
        return train_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def language_modeling_examples(tokenizer, text: str = SAMPLE_TEXT, length: int = 32) -> list[dict[str, torch.Tensor]]:
    """Cut the tokenized text into examples of ``length`` tokens for next-token prediction.

    Each example is ``{"input_ids": (length,), "labels": (length,)}`` with ``labels == input_ids``:
    GPT-2 shifts the labels by one inside its loss, so position t is scored on token t + 1.
    A tail shorter than ``length`` is dropped.
    """
    ids = torch.tensor(tokenizer(text)["input_ids"])  # (N,)
    n_examples = len(ids) // length
    blocks = ids[: n_examples * length].view(n_examples, length)  # (n_examples, length)
    return [{"input_ids": block, "labels": block.clone()} for block in blocks]
