"""PEFT's task wrappers: ``PeftModelForCausalLM``, ``PeftModelForSequenceClassification``, ... .

``get_peft_model`` and ``PeftModel.from_pretrained`` (compat.py) build one of these subclasses of
``PeftModel`` when the config has a ``task_type``, through ``TASK_MODELS`` (PEFT's
``MODEL_TYPE_TO_PEFT_MODEL_MAPPING``, peft/auto.py). PEFT's classes (peft/peft_model.py) hold much
code for prompt learning; for LoRA each one differs from ``PeftModel`` in what is here:

- ``forward`` takes the task's arguments by name (``labels``, ``start_positions``,
  ``decoder_input_ids``, ...), PEFT's signatures, which ``transformers.Trainer`` reads;
- ``TASK_HEADS``: SEQ_CLS, TOKEN_CLS and QUESTION_ANS train the new, random head in full and save it
  with the adapter, as PEFT adds its names (``classifier`` / ``score``, ``qa_outputs``) to the
  config's ``modules_to_save`` (``add_task_head``; TOKEN_CLS and QUESTION_ANS only after injecting,
  ``HEAD_AFTER_INJECTION``, hence ``check_head_not_targeted``);
- ``GENERATES``: CAUSAL_LM and SEQ_2_SEQ_LM need a model that can generate.

``PeftModel`` reads those class attributes. Import the wrappers from ``minilora.compat``, as PEFT's
from ``peft``: this file subclasses ``PeftModel``, so it imports compat.py, and compat.py imports
this file only when one of its names is first asked for (compat.py's ``__getattr__``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .compat import PeftModel
from .compat_config import LoraConfig
from .config import MiniLoraError
from .targets import find_targets


# --------------------------------------------------------------------------------------------
# The task head: trained in full and saved (modules_to_save)
# --------------------------------------------------------------------------------------------
def add_task_head(model: nn.Module, config: LoraConfig, heads: list[str], task: str) -> None:
    """As PEFT's task models do (PeftModelForSequenceClassification: ``classifier`` / ``score``, ...):
    append the task's head names to the config's ``modules_to_save`` (in place, as PEFT changes its
    config), so that the new, random head trains in full and is saved with the adapter.

    Raises:
        MiniLoraError: when the model has no module of those names (e.g. T5ForSequenceClassification's
            ``classification_head``) and ``modules_to_save`` names none either: PEFT then leaves the
            random head frozen and unsaved, without a word.
    """
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    wanted = (config.modules_to_save or []) + heads
    wrapper_names = [name for name in ("base_model", "base_model.model") if any(name.endswith(m) for m in wanted)]
    if wrapper_names:  # PEFT's task models match modules_to_save against the wrapper's own names too
        raise MiniLoraError(f"task_type={task}: modules_to_save={config.modules_to_save} ends {wrapper_names[-1]!r}, a "
                            "name of PEFT's wrapper itself, so PEFT would wrap the whole model as a module to save. "
                            "Name the module by a longer, dotted name.")
    if not any(name.endswith(head) for name in names for head in wanted):
        raise MiniLoraError(
            f"task_type={task}: PEFT trains and saves the task head by the names {heads}, but this "
            f"{type(model).__name__} has no module of those names, so PEFT would leave its random head frozen and "
            f"unsaved. Name the head: LoraConfig(..., modules_to_save=[...]) with one of "
            f"{[name for name, _ in model.named_children()]}."
        )
    append_heads(config, heads)


def append_heads(config: LoraConfig, heads: list[str]) -> None:
    """PEFT's task models append their heads to a new adapter's modules_to_save: a new list, or the heads
    appended to the user's (repeats kept; an adapter loaded from a file that lists them lists them twice)."""
    if config.modules_to_save is None:
        config.modules_to_save = list(heads)
    else:
        config.modules_to_save.extend(heads)


def check_head_not_targeted(model: nn.Module, config: LoraConfig, heads: list[str], wrapper: str) -> None:
    """PEFT's ``PeftModelForTokenClassification`` and ``...ForQuestionAnswering`` add their head to
    ``modules_to_save`` only after injecting, so targets that reach the head (``"all-linear"``, a regex)
    put LoRA on it first. Wrapping a head that is itself a LoRA layer then fails (a TypeError); a head
    built of layers (RoBERTa's ``classifier.dense`` and ``.out_proj``) is wrapped with LoRA layers inside
    its original and its trained copy, which minilora does not build. Both refused here, before anything
    changes."""
    targets = find_targets(model, config)
    hit = [name for name in targets if any(name.endswith(head) for head in heads)]
    if hit:
        raise MiniLoraError(f"{wrapper}: target_modules={config.target_modules!r} selects the task head {hit[0]!r}, "
                            f"which PEFT then also trains in full (modules_to_save {heads}): a module cannot be both, "
                            "and PEFT fails here with a TypeError. Leave the head out, e.g. "
                            f"exclude_modules={heads[:1]}, or put it in modules_to_save yourself.")
    # a layer inside the head: some dotted prefix of its name is a module PEFT wraps (its names end with a head's)
    inside = [(name, prefix) for name in targets for prefix in _prefixes(name)[:-1]
              if any(prefix.endswith(head) for head in heads)]
    if inside:
        name, head = inside[0]
        raise MiniLoraError(f"{wrapper}: target_modules={config.target_modules!r} selects {name!r}, inside the task head "
                            f"{head!r}, which PEFT then also trains in full (modules_to_save {heads}), copying the "
                            "LoRA layers into the trained copy: LoRA inside a module trained in full, which minilora "
                            f"does not build. Leave the head's layers out, e.g. exclude_modules=[{name!r}, ...], or "
                            f"put the head in modules_to_save yourself (then no target lies inside it, as in PEFT).")


def _prefixes(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


# --------------------------------------------------------------------------------------------
# The task wrappers: the task's forward arguments, and the head they train
# --------------------------------------------------------------------------------------------
def _forward_with_labels(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                         output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                         **kwargs: Any) -> Any:
    """PEFT's forward arguments for CAUSAL_LM and SEQ_CLS (transformers.Trainer reads ``labels`` here)."""
    with self._peft_forward_args(kwargs):
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               labels=labels, output_attentions=output_attentions,
                               output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)


class PeftModelForCausalLM(PeftModel):
    """PEFT's model for causal language models (task_type CAUSAL_LM): PEFT's forward arguments."""

    GENERATES = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("adapter_names") is not None and getattr(getattr(self.get_base_model(), "config", None),
                                                               "model_type", None) == "mpt":
            raise MiniLoraError("adapter_names with an MPT model: PEFT's PeftModelForCausalLM calls MPT without its "
                                "mixed-batch hooks, so every row runs the active adapter and adapter_names is silently "
                                "ignored. Run the rows of each adapter as separate batches (set_adapter, or "
                                "disable_adapter() for the base model's rows).")
        return _forward_with_labels(self, *args, **kwargs)


class PeftModelForSequenceClassification(PeftModel):
    """task_type SEQ_CLS: the head (``classifier`` or ``score``) trains in full and is saved."""

    TASK_HEADS = ["classifier", "score"]

    forward = _forward_with_labels


class PeftModelForTokenClassification(PeftModelForSequenceClassification):
    """task_type TOKEN_CLS: as SEQ_CLS, the head trains in full and is saved."""

    HEAD_AFTER_INJECTION = True


class PeftModelForQuestionAnswering(PeftModel):
    """task_type QUESTION_ANS: the head ``qa_outputs`` trains in full and is saved."""

    TASK_HEADS = ["qa_outputs"]
    HEAD_AFTER_INJECTION = True

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        # (as PEFT 0.21's: token_type_ids and position_ids are accepted and not passed on)
        with self._peft_forward_args(kwargs):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   start_positions=start_positions, end_positions=end_positions,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict, **kwargs)


class PeftModelForSeq2SeqLM(PeftModel):
    """task_type SEQ_2_SEQ_LM (T5, BART, ...): PEFT's forward arguments."""

    GENERATES = True

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, decoder_input_ids=None,
                decoder_attention_mask=None, decoder_inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        with self._peft_forward_args(kwargs):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                   decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict, **kwargs)

    def generate(self, **kwargs: Any) -> Any:
        """As PEFT's: keyword arguments only (``generate(input_ids=...)``); a positional one is a TypeError."""
        return super().generate(**kwargs)


class PeftModelForFeatureExtraction(PeftModel):
    """task_type FEATURE_EXTRACTION: PEFT's forward arguments."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, **kwargs: Any) -> Any:
        with self._peft_forward_args(kwargs):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                   return_dict=return_dict, **kwargs)


# PEFT's MODEL_TYPE_TO_PEFT_MODEL_MAPPING: which wrapper get_peft_model and from_pretrained build.
TASK_MODELS = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}
