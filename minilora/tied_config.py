"""What ``merge_and_unload`` tells the model's config when the output embedding stops being tied.

transformers models with ``config.tie_word_embeddings=True`` share one weight between the input
embedding and the output embedding (GPT-2's ``wte`` and ``lm_head``). After ``merge_and_unload`` the
output embedding can hold a weight of its own: a trained ``modules_to_save`` copy of ``lm_head``, or
``W0 + dW`` of a LoRA on a tied ``lm_head`` (merging unties it, layer.py). A config that still says
"tied" then lies about the model, and a loader that believes it ties ``lm_head`` to the embedding
again and drops what was trained.

PEFT 0.21 (``BaseTuner._unload_and_optionally_merge``, PR #3126, for transformers issue 45127) sets
``config.tie_word_embeddings = False`` with a warning whenever the two weights differ after merging.
minilora does the same where that flag ties nothing else. In encoder-decoder models (BART, mBART,
Pegasus, T5 and its family, Switch Transformers) the same flag also ties the encoder's and decoder's
``embed_tokens`` to ``shared``, and in Switch Transformers (and UDOP) the forward reads it to scale
the decoder output by ``d_model ** -0.5``. There PEFT's ``False`` is a silently different model:
Switch Transformers' merged outputs are no longer its unmerged ones, and ``save_pretrained`` +
``from_pretrained`` leave the encoder's embedding newly initialised (BART, mBART, Pegasus, Switch
Transformers; measured in tests/test_tied_config.py). So there minilora keeps the flag, says so, and
relies on what transformers 5 does on loading: a tied weight whose saved values differ from its
source's is loaded as saved, not tied (``PreTrainedModel.tie_weights``, with its own warning).
transformers 4 ties whatever the flag says on loading, which would drop the output embedding that
the merge produced: there minilora does what PEFT does in every model.
"""

from __future__ import annotations

import warnings

from torch import nn

# PEFT's words (peft/tuners/tuners_utils.py), so that code filtering PEFT's warning filters this one
UNTIED_WARNING = ("Input and output embeddings are no longer tied after merging. "
                  "Setting `tie_word_embeddings=False` in the model config.")


def update_tie_word_embeddings(model: nn.Module) -> None:
    """After merge_and_unload: if ``model.config.tie_word_embeddings`` is True but the output embedding's
    weight is no longer the input embedding's (PEFT's test: another ``data_ptr``), set the flag False
    with PEFT's warning, unless the flag also ties other parameters; then keep it and warn why."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    try:
        output, input_ = model.get_output_embeddings(), model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # (PEFT skips such models the same way)
        return
    output_weight, input_weight = getattr(output, "weight", None), getattr(input_, "weight", None)
    if output_weight is None or input_weight is None or output_weight.data_ptr() == input_weight.data_ptr():
        return
    output_name = next(name for name, module in model.named_modules() if module is output)
    others = _other_tied_parameters(model, output_name)
    if not others:  # (always so with transformers 4: _other_tied_parameters)
        config.tie_word_embeddings = False
        warnings.warn(UNTIED_WARNING, stacklevel=3)
        return
    warnings.warn(
        f"merge_and_unload: {output_name} now has a weight of its own, no longer the input embedding's, but "
        f"model.config.tie_word_embeddings stays True: in this {type(model).__name__} the flag also ties "
        f"{others} (and in some models scales the decoder output), so False (what PEFT sets) would change the "
        "model's outputs or make from_pretrained leave those weights uninitialised. save_pretrained writes "
        f"{output_name}, and transformers 5 loads it as saved (it does not tie weights whose saved values differ, "
        "and warns so).", stacklevel=3)


def _other_tied_parameters(model: nn.Module, output_name: str) -> list[str]:
    """The parameters that ``tie_word_embeddings`` ties, other than the output embedding's own."""
    if not hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 4: not asked (see the docstring)
        return []
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)  # {tied name: the name it shares}
    return sorted(name for name in tied if not name.startswith(output_name + "."))
