"""``pipeline("headinfer-qa")``: many questions about one long context, from a single prefill.

Registered with transformers when headinfer is imported, in kvpress's convention::

    import headinfer
    from transformers import pipeline

    pipe = pipeline("headinfer-qa", model=model, tokenizer=tokenizer)
    pipe(context, question="Who wrote it?", max_new_tokens=32)      # {"answer": "..."}
    pipe(context, questions=["Who?", "When?"], max_new_tokens=32)   # {"answers": [...]}

The context is prefilled once into a ``HeadInferCache``; each question is appended to it,
answered by ``generate()``, and the cache is cropped back to the context for the next one. The
answers are the tokens that ``generate()`` gives for context + question from scratch (the same
token ids, greedy by default). On models with sliding-window layers (Mistral, Qwen2, Gemma-2)
the cache keeps the whole context on those layers too (``HeadInferCache(croppable=True)``), as
cropping back needs it. A model that is not patched is patched for the call and restored
afterwards (``with headinfer.patch(model):``); a patched one keeps its settings.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .cache import HeadInferCache
from .patch import is_patched, patch
from .prefill import cache_kwarg_name

__all__ = ["TASK", "HeadInferQAPipeline"]

logger = logging.getLogger("headinfer")

#: The task name ``transformers.pipeline`` knows the pipeline by.
TASK = "headinfer-qa"

# Marks where the question goes in the chat template's rendering of the user turn.
_MARKER = "\x00headinfer-question\x00"


class HeadInferQAPipeline(Pipeline):
    """Answer questions about one long context, prefilled once (see the module docstring).

    Call arguments: ``context`` (str); ``question`` (str) or ``questions`` (list of str);
    ``max_new_tokens`` (default 50); ``answer_prefix`` (text the answer starts with, default
    none); any other keyword goes to ``generate()`` (e.g. ``do_sample=True``; default greedy).

    The prompt is the user turn of the chat template (when the tokenizer has one) holding the
    context, a blank line and the question, then the assistant's turn; without a template, the
    tokenizer's BOS, the context, a blank line, the question and a newline.
    """

    # transformers' Pipeline declares these as None (unset); a pipeline class sets them.
    _load_processor = False  # type: ignore[assignment]
    _load_image_processor = False  # type: ignore[assignment]
    _load_feature_extractor = False  # type: ignore[assignment]
    _load_tokenizer = True  # type: ignore[assignment]

    def _sanitize_parameters(
        self,
        question: str | None = None,
        questions: list[str] | None = None,
        answer_prefix: str | None = None,
        max_new_tokens: int | None = None,
        **generate_kwargs: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        preprocess: dict[str, Any] = {}
        forward: dict[str, Any] = {}
        postprocess: dict[str, Any] = {}
        if question is not None and questions is not None:
            raise ValueError("question, questions: give one of them, not both")
        if question is not None:
            if not isinstance(question, str):
                raise TypeError(f"question: expected a str, got {type(question).__name__}")
            preprocess["questions"] = [question]
            postprocess["single"] = True
        elif questions is not None:
            if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
                raise TypeError("questions: expected a list of str")
            if not questions:
                raise ValueError("questions: the list is empty")
            preprocess["questions"] = list(questions)
            postprocess["single"] = False
        if answer_prefix is not None:
            preprocess["answer_prefix"] = answer_prefix
        if max_new_tokens is not None:
            if max_new_tokens <= 0:
                raise ValueError(f"max_new_tokens: must be positive, got {max_new_tokens}")
            forward["max_new_tokens"] = max_new_tokens
            preprocess["max_new_tokens"] = max_new_tokens
        if generate_kwargs:
            forward["generate_kwargs"] = generate_kwargs
        return preprocess, forward, postprocess

    def _split_prompt(self, context: str) -> tuple[str, str]:
        """``(context part, question suffix)``: the prompt is context part + question + suffix."""
        tokenizer: Any = self.tokenizer  # set: _load_tokenizer
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"{context}\n\n{_MARKER}"}],
                tokenize=False,
                add_generation_prompt=True,
            )
            if text.count(_MARKER) != 1:
                raise ValueError("the tokenizer's chat template does not keep the user's text")
            before, after = text.split(_MARKER)
            return before, after
        return f"{tokenizer.bos_token or ''}{context}\n\n", "\n"

    # Pipeline's hooks take the keywords _sanitize_parameters returns, not its generic ones.
    def preprocess(  # type: ignore[override]
        self,
        context: str,
        questions: list[str] | None = None,
        answer_prefix: str = "",
        max_new_tokens: int = 50,
    ) -> dict[str, Any]:
        if not isinstance(context, str):
            raise TypeError(f"context: expected a str, got {type(context).__name__}")
        if questions is None:
            raise ValueError("question or questions: give the question(s) to ask")
        head, suffix = self._split_prompt(context)

        tokenizer: Any = self.tokenizer

        def ids(text: str) -> torch.Tensor:
            return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]

        head_ids = ids(head)
        prompts = [ids(f"{head}{q}{suffix}{answer_prefix}") for q in questions]
        # The context's tokens are the part that every whole prompt's own tokenization shares
        # with it: a tokenizer may merge across the boundary (SmolLM2's makes the "\n\n" that
        # ends the context one token at the end of a string, two before a word), and each answer
        # must be what generate() gives for its whole prompt, tokenized as one text.
        shared = head_ids.shape[1]
        for prompt in prompts:
            n = min(shared, prompt.shape[1])
            differs = (prompt[0, :n] != head_ids[0, :n]).nonzero()
            shared = int(differs[0, 0]) if len(differs) else n
        context_ids = head_ids[:, :shared]
        question_ids = [prompt[:, shared:] for prompt in prompts]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(q.shape[1] for q in question_ids)
        if isinstance(limit, int) and context_ids.shape[1] + longest + max_new_tokens > limit:
            raise ValueError(
                f"context: {context_ids.shape[1]:,} tokens + the longest question's "
                f"{longest:,} + max_new_tokens {max_new_tokens} are more than the model's "
                f"max_position_embeddings ({limit:,}); shorten the context"
            )
        return {"context_ids": context_ids, "question_ids": question_ids}

    def _forward(  # type: ignore[override]
        self,
        model_inputs: dict[str, Any],
        max_new_tokens: int = 50,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> list[str]:
        model: Any = self.model
        tokenizer: Any = self.tokenizer
        kwargs = {"do_sample": False, **(generate_kwargs or {})}
        name = cache_kwarg_name(model)
        # A model that is not patched runs through headinfer for this call only.
        scope: Any = contextlib.nullcontext() if is_patched(model) else patch(model)
        with scope:
            device = next(model.parameters()).device
            context = model_inputs["context_ids"].to(device)
            longest = max(q.shape[1] for q in model_inputs["question_ids"])
            # Sliding-window layers keep the whole context, so that the cache can be cropped
            # back to it after each answer.
            cache = HeadInferCache(model, croppable=True)
            cache.expected_new_tokens = longest + max_new_tokens
            model(context, logits_to_keep=1, use_cache=True, **{name: cache})
            length = cache.get_seq_length()
            logger.debug("headinfer-qa: context of %d tokens prefilled", length)
            answers = []
            for question in model_inputs["question_ids"]:
                ids = torch.cat([context, question.to(device)], dim=1)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    **{name: cache},
                    **kwargs,
                )
                new = out[0, ids.shape[1] :]
                answers.append(tokenizer.decode(new, skip_special_tokens=True))
                cache.crop(length)  # back to the context alone
        return answers

    def postprocess(  # type: ignore[override]
        self, model_outputs: list[str], single: bool = True
    ) -> dict[str, Any]:
        if single:
            return {"answer": model_outputs[0]}
        return {"answers": model_outputs}


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=HeadInferQAPipeline, pt_model=AutoModelForCausalLM
)
