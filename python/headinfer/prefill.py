"""The patched forward: input checks and chunked prefill.

A prompt longer than ``chunk_size`` runs through the model's own forward chunk by chunk, each
chunk appending to the cache and attending over everything before it, so activations stay the
size of one chunk. The result equals the unpatched forward: logits the caller keeps are gathered
from the chunks that hold them (intermediate chunks compute one logit, not ``chunk x vocab``),
hidden states are concatenated, a loss is computed once over the whole sequence.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from .attention import CACHE_KWARG
from .cache import HeadInferCache
from .callsite import user_stacklevel
from .device import check_device
from .settings import PatchSettings

_slice_logits_to_keep: Callable[..., torch.Tensor] | None
try:
    from transformers.modeling_utils import slice_logits_to_keep as _slice_logits_to_keep
except ImportError:  # transformers < 5.24 slices inline in each model's forward
    _slice_logits_to_keep = None

__all__ = [
    "CACHE_NAMES",
    "cache_kwarg_name",
    "forward_params",
    "patched_forward",
    "warn_cache_not_headinfer",
]

logger = logging.getLogger("headinfer")

#: The two names transformers has used for the forward's cache argument (5.24 renamed it).
CACHE_NAMES = ("cache", "past_key_values")


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """``"cache"`` where the model's forward takes it (transformers >= 5.24), else the old name."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_params(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the positional-or-keyword parameters of the model's forward, ``self`` excluded."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


def warn_cache_not_headinfer(model: torch.nn.Module, settings: PatchSettings, what: str) -> None:
    """Warn, once per patched model, that ``what`` (a cache the caller chose) bypasses the store.

    Such a cache still gives exact results (attention runs on the keys it hands over), but its
    keys and values stay where it keeps them, on the GPU for a ``DynamicCache``: the user who
    patched the model for its memory behaviour would otherwise run out of it unawares.
    """
    if settings.warned_cache:
        return
    settings.warned_cache = True
    kept = "" if settings.kv_dtype == "exact" else f", nor in kv_dtype={settings.kv_dtype!r}"
    warnings.warn(
        f"{what} given to a model patched by headinfer: its keys and values stay in that cache, "
        f"not in headinfer's store{kept} (nothing is offloaded by headinfer, and GPU memory "
        "grows with the context); pass a headinfer.HeadInferCache(model), or no cache and "
        "generate() makes one. Warned once per model.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def _find_cache(kwargs: Mapping[str, Any]) -> tuple[str | None, Any]:
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _check_inputs(
    model: torch.nn.Module, settings: PatchSettings, kwargs: dict[str, Any], cache: Any
) -> tuple[str, torch.Tensor]:
    # Every check runs before the model touches the cache, so a rejected call leaves it as it was.
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True: headinfer never materialises attention weights; "
            "unpatch the model (headinfer.unpatch) to get them"
        )
    name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    x = kwargs.get(name)
    if x is None:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    check_device(x, name)
    if x.shape[0] != 1:
        raise ValueError(
            f"{name}: headinfer runs batch size 1 for now, got batch size {x.shape[0]} "
            f"(shape {tuple(x.shape)}); run the sequences one at a time"
        )
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            raise ValueError(
                f"attention_mask: headinfer takes a 2D padding mask (all ones), "
                f"got shape {tuple(mask.shape)}"
            )
        if not bool(mask.all()):
            raise ValueError(
                "attention_mask: contains padding (zeros); headinfer runs one unpadded sequence "
                "at a time, so pass the sequence without padding"
            )
    elif mask is not None:
        raise ValueError(f"attention_mask: expected a 2D tensor, got {type(mask).__name__}")
    if cache is not None and getattr(cache, "is_compileable", False):
        # A static cache hands attention fixed-size, partly empty keys that only its mask
        # tells apart; headinfer builds no mask, so it would attend to the empty slots.
        raise ValueError(
            f"cache: a {type(cache).__name__} (static) does not work with headinfer; "
            "use a HeadInferCache (the default) or a DynamicCache"
        )
    if isinstance(cache, HeadInferCache) and cache.spec != settings.spec:
        raise ValueError(
            f"cache: built for a different model ({cache.spec.family}, "
            f"{cache.spec.num_layers} layers) than this {settings.spec.family} model"
        )
    # No check against max_position_embeddings: transformers runs past it (RoPE extrapolates;
    # generate() logs a warning and goes on), and so does headinfer.
    return name, x


def patched_forward(
    model: torch.nn.Module,
    original: Callable[..., Any],
    settings: PatchSettings,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run ``original`` (the model's unpatched forward) the headinfer way.

    Takes the model's forward arguments: ``input_ids`` ``[1, L]`` or ``inputs_embeds``
    ``[1, L, hidden]``; a 2D all-ones ``attention_mask``; the cache (``cache`` or
    ``past_key_values``: a ``HeadInferCache``, another ``Cache``, or none, in which case a
    ``HeadInferCache`` is made when ``use_cache``). Returns what the unpatched forward returns.
    """
    if len(args) > len(settings.forward_params):
        raise TypeError(f"forward() takes at most {len(settings.forward_params)} positional args")
    for name, value in zip(settings.forward_params, args):
        if name in kwargs:
            raise TypeError(f"forward() got multiple values for argument {name!r}")
        kwargs[name] = value

    cache_name, cache = _find_cache(kwargs)
    input_name, x = _check_inputs(model, settings, kwargs, cache)
    length = x.shape[1]

    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(model.config, "use_cache", True)
    temporary = False
    if cache is None and (use_cache or length > settings.chunk_size):
        # A patched model keeps its KV in the store; without use_cache the cache only carries
        # keys from one chunk to the next and is dropped from the output.
        cache = HeadInferCache(model)
        cache_name = settings.cache_name
        kwargs[cache_name] = cache
        temporary = not use_cache

    if not isinstance(cache, HeadInferCache):
        if cache is not None:
            warn_cache_not_headinfer(model, settings, type(cache).__name__)
        # Another Cache (or none): the attention function runs the dense op on what it is given.
        if length <= settings.chunk_size:
            return original(**kwargs)
        return _chunked(model, original, settings, kwargs, input_name, x, cache, temporary)

    kwargs[CACHE_KWARG] = cache
    # The cache is this thread's from the plan to the last chunk (another thread's forward on
    # it raises HeadInferError meanwhile).
    with cache._claimed():
        if not cache.has_store and isinstance(x, torch.Tensor):
            dtype = x.dtype if input_name == "inputs_embeds" else next(model.parameters()).dtype
            cache._ensure_store(dtype, x.device)
        cache.prepare(cache.get_seq_length() + length, length)
        with cache.bound():
            if length <= settings.chunk_size and not temporary:
                return original(**kwargs)
            return _chunked(model, original, settings, kwargs, input_name, x, cache, temporary)


def _slice_like_transformers(hidden: torch.Tensor, keep: Any) -> torch.Tensor:
    # What *ForCausalLM.forward does to its hidden states [B, L, H] with logits_to_keep.
    if _slice_logits_to_keep is not None:  # transformers >= 5.24
        return _slice_logits_to_keep(hidden, keep)
    index = slice(-keep, None) if isinstance(keep, int) else keep  # 5.17 to 5.23
    return hidden[:, index, :]


def _kept_positions(keep: Any, length: int, hidden_size: int) -> tuple[int, torch.Tensor | None]:
    """Which positions of a ``length``-token forward ``logits_to_keep`` keeps, and in what shape.

    Returns ``(first, None)`` when they are the positions ``first..length`` in order (an int
    ``keep``), else ``(0, index)``: ``index`` holds the position of every logit the forward
    returns, in the shape of its logits less the vocabulary axis. Both come from transformers'
    own slicing applied to the positions, so an out-of-range or malformed ``keep`` raises what
    the unpatched forward raises (before any chunk runs, rather than after the last).
    """
    if isinstance(keep, int):
        kept = range(length)[-keep:]
        return (kept.start if kept else length), None
    if isinstance(keep, torch.Tensor):
        keep = keep.cpu()
    positions = torch.arange(length).view(1, length, 1)
    try:
        index = _slice_like_transformers(positions, keep)
    except Exception:
        # The same call on the hidden states' own shape, so the message is word for word the
        # one the unpatched forward gives (it can name the shape); expand() copies nothing.
        _slice_like_transformers(positions.expand(1, length, hidden_size), keep)
        raise
    return 0, index[..., 0]


def _hidden_size(model: torch.nn.Module) -> int:
    config: Any = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return int(config.hidden_size)


def _chunked(
    model: torch.nn.Module,
    original: Callable[..., Any],
    settings: PatchSettings,
    kwargs: dict[str, Any],
    input_name: str,
    x: torch.Tensor,
    cache: Any,
    temporary: bool,
) -> Any:
    length = x.shape[1]
    chunk = settings.chunk_size
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    labels = kwargs.pop("labels", None)
    first, index, wanted_positions = length, None, None
    if settings.takes_logits_to_keep:
        keep = kwargs.pop("logits_to_keep", 0)
        first, index = _kept_positions(keep, length, _hidden_size(model))
        if index is not None:
            # Each position once, in order; `inverse` puts them back in the order asked for.
            wanted_positions, inverse = torch.unique(index, return_inverse=True)
    position_ids = kwargs.pop("position_ids", None)
    cache_position = kwargs.pop("cache_position", None)
    mask = kwargs.pop("attention_mask", None)
    # The user's name for the cache, else the forward's own (a cache the first chunk made).
    cache_name = _find_cache(kwargs)[0] or settings.cache_name

    logits: list[torch.Tensor] = []
    states: list[torch.Tensor] = []
    hidden: list[tuple[torch.Tensor, ...]] = []
    out = None
    bar = tqdm(
        total=length,
        desc="headinfer prefill",
        unit="tok",
        delay=settings.progress_delay,
        disable=None if settings.progress else True,
        leave=False,
    )
    with bar:
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            step = dict(kwargs)
            step[input_name] = x[:, start:end]
            if position_ids is not None:
                step["position_ids"] = position_ids[..., start:end]
            if cache_position is not None:
                step["cache_position"] = cache_position[start:end]
            if mask is not None:
                # The mask may cover cached tokens too: cut from its end.
                step["attention_mask"] = mask[:, : mask.shape[1] - (length - end)]
            wanted: int | torch.Tensor | None = None
            if wanted_positions is not None:
                local = wanted_positions[(wanted_positions >= start) & (wanted_positions < end)]
                wanted = (local - start).to(x.device) if local.numel() else None
            elif end > max(start, first):
                wanted = end - max(start, first)
            if settings.takes_logits_to_keep:
                # A chunk none of whose logits are wanted computes one, not chunk x vocab.
                step["logits_to_keep"] = 1 if wanted is None else wanted
            if cache is not None:
                step[cache_name] = cache
            out = original(**step, return_dict=True)
            # Only the current name: 5.24's outputs log a deprecation when asked for the old one.
            returned = out.get(settings.cache_name)
            cache = cache if returned is None else returned
            if "logits" in out and wanted is not None:
                logits.append(out["logits"])
            if "last_hidden_state" in out:
                states.append(out["last_hidden_state"])
            if out.get("hidden_states") is not None:
                hidden.append(out["hidden_states"])
            bar.update(end - start)
    logger.debug("prefilled %d tokens in chunks of %d", length, chunk)

    assert out is not None
    fields = dict(out)
    if settings.takes_logits_to_keep and "logits" in out:
        # No wanted logit at all: an empty slice of the last chunk's, for dtype and vocab.
        kept = torch.cat(logits, dim=1) if logits else out["logits"][:, :0]
        if index is not None:
            kept = kept[0][inverse.to(kept.device)]
        fields["logits"] = kept
    if states:
        fields["last_hidden_state"] = torch.cat(states, dim=1)
    if hidden:
        fields["hidden_states"] = tuple(torch.cat(parts, dim=1) for parts in zip(*hidden))
    if labels is not None:
        extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        loss_function: Any = model.loss_function  # a PreTrainedModel's (a Module attribute)
        fields["loss"] = loss_function(
            logits=fields["logits"],
            labels=labels,
            vocab_size=cast(Any, model.config).vocab_size,
            **extra,
        )
    if temporary:
        for name in CACHE_NAMES:
            fields.pop(name, None)
    result = type(out)(**fields)
    return result if return_dict else result.to_tuple()
