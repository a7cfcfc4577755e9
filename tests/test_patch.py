"""patch()/unpatch(): per object, idempotent, exactly reversible."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from _tiny import prompt, rel_err, tiny_model, twin
from transformers import GPT2Config, GPT2LMHeadModel

import headinfer
from headinfer.prefill import cache_kwarg_name


def test_patch_returns_model_and_is_idempotent() -> None:
    model = tiny_model("llama")
    assert headinfer.patch(model, chunk_size=64, block_size=16) is model
    forward, generate = model.forward, model.generate
    assert headinfer.is_patched(model)
    assert model.config._attn_implementation == "headinfer"
    assert headinfer.patch(model, chunk_size=32) is model
    # Patched once: the same wrappers, only the settings changed.
    assert model.forward is forward and model.generate is generate
    assert model._headinfer.chunk_size == 32


def test_unpatch_restores_exactly() -> None:
    model = tiny_model("mistral")
    ids = prompt(120)
    with torch.no_grad():
        before = model(ids).logits
    assert "forward" not in model.__dict__
    headinfer.patch(model, chunk_size=50, block_size=16)
    assert "forward" in model.__dict__ and "generate" in model.__dict__
    assert headinfer.unpatch(model) is model
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert "_headinfer" not in model.__dict__
    assert model.config._attn_implementation == "eager"
    assert not headinfer.is_patched(model)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)
    assert headinfer.unpatch(model) is model  # not patched: nothing to do


def test_unpatch_restores_an_instance_forward() -> None:
    # accelerate hooks replace forward on the instance; patch wraps it and unpatch puts it back.
    model = tiny_model("llama")
    calls = []
    inner = model.forward

    def hooked(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return inner(*args, **kwargs)

    model.forward = hooked
    headinfer.patch(model, chunk_size=64, block_size=16)
    with torch.no_grad():
        model(prompt(100))
    assert len(calls) == 2  # two chunks, each through the hook
    headinfer.unpatch(model)
    assert model.__dict__["forward"] is hooked


def test_patch_is_per_object() -> None:
    patched, plain = tiny_model("qwen2"), tiny_model("qwen2")
    headinfer.patch(patched, chunk_size=64, block_size=16)
    assert plain.config._attn_implementation == "eager"
    assert "forward" not in plain.__dict__
    assert type(plain).forward is type(patched).forward


def test_patched_then_unpatched_generate_equal() -> None:
    model = tiny_model("gemma2")
    reference = twin(model)
    headinfer.patch(model, chunk_size=64, block_size=16)
    headinfer.unpatch(model)
    headinfer.patch(model, chunk_size=64, block_size=16)
    ids = prompt(150)
    a = model.generate(ids, max_new_tokens=4, do_sample=False)
    b = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


def test_generate_keeps_signature_for_logits_to_keep() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    assert model._supports_logits_to_keep()


def test_unsupported_model_lists_families() -> None:
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    model = GPT2LMHeadModel(config)
    with pytest.raises(headinfer.UnsupportedModelError) as info:
        headinfer.patch(model)
    message = str(info.value)
    for family in ("llama", "mistral", "qwen2", "gemma2"):
        assert family in message
    assert "gpt2" in message
    assert isinstance(info.value, headinfer.HeadInferError)
    assert "forward" not in model.__dict__
    assert model.config._attn_implementation != "headinfer"


def test_unsupported_dtype() -> None:
    with pytest.raises(TypeError, match="dtype"):
        headinfer.patch(tiny_model("llama").to(torch.float64))


BAD_SETTINGS = [
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 64.0}, TypeError, "chunk_size"),
    ({"chunk_size": True}, TypeError, "chunk_size"),
    ({"block_size": -1}, ValueError, "block_size"),
    ({"block_size": 16.5}, TypeError, "block_size"),
    ({"gpu_budget": 0}, ValueError, "gpu_budget"),
    ({"gpu_budget": "0"}, ValueError, "gpu_budget"),
    ({"gpu_budget": "0GiB"}, ValueError, "gpu_budget"),
    ({"gpu_budget": float("nan")}, ValueError, "gpu_budget"),
    ({"gpu_budget": float("inf")}, ValueError, "gpu_budget"),
    ({"gpu_budget": True}, TypeError, "gpu_budget"),
    ({"host_memory_limit": 0}, ValueError, "host_memory_limit"),
    ({"host_memory_limit": -1}, ValueError, "host_memory_limit"),
    ({"host_memory_limit": "lots"}, ValueError, "host_memory_limit"),
    ({"host_memory_limit": float("nan")}, ValueError, "host_memory_limit"),
    ({"host_memory_limit": [1]}, TypeError, "host_memory_limit"),
    ({"cpu_heads": -1}, ValueError, "cpu_heads"),
    ({"cpu_heads": 3}, ValueError, "cpu_heads"),  # the tiny model has 2 kv heads
    ({"cpu_heads": 1.0}, TypeError, "cpu_heads"),
    ({"kv_dtype": "fp8"}, ValueError, "kv_dtype"),
    ({"kv_dtype": "float16"}, ValueError, "kv_dtype"),
    ({"kv_dtype": 8}, TypeError, "kv_dtype"),
]


@pytest.mark.parametrize(("kwargs", "error", "name"), BAD_SETTINGS)
def test_bad_settings(kwargs: dict, error: type, name: str) -> None:
    model = tiny_model("llama")
    with pytest.raises(error, match=f"^{name}: "):
        headinfer.patch(model, **kwargs)
    assert not headinfer.is_patched(model)
    if name != "chunk_size":  # HeadInferCache takes the others, checked alike
        with pytest.raises(error, match=f"^{name}: "):
            headinfer.HeadInferCache(model.config, **kwargs)
        with pytest.raises(error, match=f"^{name}: "):
            headinfer.HeadInferCache(model, **kwargs)


def test_sizes_accepted_as_strings() -> None:
    model = headinfer.patch(tiny_model("llama"), host_memory_limit="64MiB", gpu_budget="2GiB")
    cache = headinfer.HeadInferCache(model)
    assert (cache.host_memory_limit, cache.gpu_budget) == (64 << 20, 2 << 30)
    assert headinfer.HeadInferCache(model.config, host_memory_limit="1GiB").host_memory_limit == (
        1 << 30
    )


def test_base_model_without_lm_head() -> None:
    from _tiny import tiny_config
    from transformers import LlamaModel

    model = LlamaModel(tiny_config("llama")).eval()
    reference = LlamaModel(tiny_config("llama")).eval()
    reference.load_state_dict(model.state_dict())
    headinfer.patch(model, chunk_size=16, block_size=16)
    ids = prompt(40)
    with torch.no_grad():
        got = model(ids)
        want = reference(ids)
    assert isinstance(got.past_key_values, headinfer.HeadInferCache)
    assert got.past_key_values.get_seq_length() == 40
    assert rel_err(got.last_hidden_state, want.last_hidden_state) < 1e-5
    headinfer.unpatch(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__


def test_logs_and_never_prints(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model("llama")
    with caplog.at_level(logging.INFO, logger="headinfer"):
        headinfer.patch(model, chunk_size=64, block_size=16)
        with torch.no_grad():
            model(prompt(150))
        headinfer.unpatch(model)
    assert any("patched" in r.message for r in caplog.records)
    captured = capsys.readouterr()
    assert captured.out == ""


def test_progress_bar_after_delay(capsys: pytest.CaptureFixture) -> None:
    # Not a terminal (pytest captures): no bar, whatever the delay.
    model = headinfer.patch(tiny_model("llama"), chunk_size=32, block_size=16, progress_delay=0)
    with torch.no_grad():
        out = model(prompt(150)).logits
    assert capsys.readouterr().err == ""
    reference = twin(model)
    headinfer.unpatch(reference)
    with torch.no_grad():
        assert rel_err(out, reference(prompt(150)).logits) < 1e-4


def test_deepcopy_of_patched_model_runs_the_copy() -> None:
    import copy

    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
        ids = prompt(100)
        assert not torch.equal(clone(ids).logits, model(ids).logits)
    assert clone.forward.model is clone
    headinfer.unpatch(clone)
    assert "forward" not in clone.__dict__ and headinfer.is_patched(model)


def test_no_transformers_deprecation_logged(caplog: pytest.LogCaptureFixture) -> None:
    # transformers reports renamed arguments (5.24: past_key_values -> cache) through its own
    # logger, once per message, not through `warnings`: clear its memory and listen.
    from transformers.utils import logging as hf_logging

    hf_logging.warning_once.cache_clear()
    hf_logging.enable_propagation()
    try:
        model = headinfer.patch(tiny_model("qwen2"), chunk_size=64, block_size=16)
        with caplog.at_level(logging.WARNING):
            out = model.generate(
                prompt(150), max_new_tokens=3, do_sample=False, return_dict_in_generate=True
            )
            model.generate(prompt(150), max_new_tokens=2, do_sample=False, use_cache=False)
            with torch.no_grad():
                model(prompt(150), use_cache=False)
                model(prompt(100), **{cache_kwarg_name(model): headinfer.HeadInferCache(model)})
        assert out.sequences.shape == (1, 153)
    finally:
        hf_logging.disable_propagation()
    assert not [r.message for r in caplog.records if "deprecat" in r.message.lower()]


# --- `with headinfer.patch(model):` ------------------------------------------------------------


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_with_patch_restores_on_exit() -> None:
    model = tiny_model("llama")
    cls, ids = type(model), prompt(120)
    before = _logits(model, ids)
    with headinfer.patch(model, chunk_size=50, block_size=16) as patched:
        assert patched is model and headinfer.is_patched(model)
        assert isinstance(model, cls) and type(model).__name__ == cls.__name__
        inside = _logits(model, ids)
    assert not headinfer.is_patched(model)
    assert type(model) is cls
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert not [k for k in model.__dict__ if k.startswith("_headinfer")]
    assert model.config._attn_implementation == "eager"
    assert torch.equal(_logits(model, ids), before)
    assert rel_err(inside, before) < 1e-4


def test_patch_still_returns_the_model_for_assignment() -> None:
    model = tiny_model("qwen2")
    same = headinfer.patch(model, chunk_size=64, block_size=16)
    assert same is model and headinfer.is_patched(model)
    headinfer.unpatch(model)
    assert type(model) is type(tiny_model("qwen2"))


def test_with_patch_nested_unwinds_one_level_at_a_time() -> None:
    model = tiny_model("mistral")
    with headinfer.patch(model, chunk_size=64, block_size=16):
        with headinfer.patch(model, chunk_size=32, block_size=16):
            assert model._headinfer.chunk_size == 32
        assert headinfer.is_patched(model) and model._headinfer.chunk_size == 64
    assert not headinfer.is_patched(model)


def test_with_patch_on_a_model_patched_before_keeps_it_patched() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    with headinfer.patch(model, chunk_size=16):
        assert model._headinfer.chunk_size == 16
    assert headinfer.is_patched(model) and model._headinfer.chunk_size == 64
    headinfer.unpatch(model)
    assert not headinfer.is_patched(model)


def test_with_patch_restores_when_the_block_raises() -> None:
    model = tiny_model("gemma2")
    cls = type(model)
    with pytest.raises(KeyError, match="inside"), headinfer.patch(model, chunk_size=64):
        raise KeyError("inside")
    assert not headinfer.is_patched(model) and type(model) is cls
    # An error of headinfer's own inside the block: restored too, and the error is the original.
    with pytest.raises(ValueError, match="batch size"), headinfer.patch(model, chunk_size=64):
        model(torch.zeros(2, 5, dtype=torch.long))
    assert not headinfer.is_patched(model)


def test_with_patch_survives_unpatch_inside_the_block() -> None:
    model = tiny_model("llama")
    with headinfer.patch(model, chunk_size=64):
        headinfer.unpatch(model)
        assert not headinfer.is_patched(model)
    assert not headinfer.is_patched(model)
    assert not [k for k in model.__dict__ if k.startswith("_headinfer")]


def test_with_on_a_patched_model_needs_a_patch_call() -> None:
    model = tiny_model("llama")
    with headinfer.patch(model, chunk_size=64):
        pass
    headinfer.patch(model, chunk_size=64)
    with model:  # the pending patch() call
        pass
    assert not headinfer.is_patched(model)
    headinfer.patch(model, chunk_size=64)
    with model:
        pass
    with pytest.raises(TypeError), model:  # unpatched: an ordinary module, no context manager
        pass
    headinfer.patch(model, chunk_size=64)
    with model, pytest.raises(RuntimeError, match="with headinfer.patch"), model:
        pass


def test_patched_model_deepcopies_as_patched() -> None:
    import copy

    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    ids = prompt(100)
    expected = _logits(model, ids)
    clone = copy.deepcopy(model)
    assert headinfer.is_patched(clone) and type(clone) is type(model)
    assert torch.equal(_logits(clone, ids), expected)
    with clone:  # the pending patch() call was copied too
        pass
    assert not headinfer.is_patched(clone) and type(clone) is type(tiny_model("llama"))
    assert headinfer.is_patched(model)


# --- a cache that is not a HeadInferCache -----------------------------------------------------


def test_dynamic_cache_warns_once_naming_the_fix() -> None:
    from transformers import DynamicCache

    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    name = cache_kwarg_name(model)
    with pytest.warns(UserWarning, match="HeadInferCache") as record:
        model.generate(prompt(100), max_new_tokens=2, do_sample=False, **{name: DynamicCache()})
    # Attributed to this file (the caller), not to headinfer's or transformers' frames.
    assert [Path(w.filename).name for w in record] == ["test_patch.py"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt(100), max_new_tokens=2, do_sample=False, **{name: DynamicCache()})
        with torch.no_grad():
            model(prompt(50), **{name: DynamicCache()})


def test_dynamic_cache_to_forward_warns() -> None:
    from transformers import DynamicCache

    model = headinfer.patch(tiny_model("qwen2"), chunk_size=64, block_size=16)
    match = "DynamicCache given to a model patched by headinfer"
    with pytest.warns(UserWarning, match=match), torch.no_grad():
        model(prompt(50), **{cache_kwarg_name(model): DynamicCache()})


def test_cache_implementation_warns() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    with pytest.warns(UserWarning, match="DynamicCache given"):
        model.generate(
            prompt(50), max_new_tokens=2, do_sample=False, cache_implementation="dynamic"
        )


def test_headinfer_cache_and_no_cache_do_not_warn() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(prompt(100), max_new_tokens=2, do_sample=False)
        cache = headinfer.HeadInferCache(model)
        model.generate(
            prompt(100), max_new_tokens=2, do_sample=False, **{cache_kwarg_name(model): cache}
        )


def test_old_cache_argument_warning_points_at_the_caller() -> None:
    model = headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)
    if cache_kwarg_name(model) != "cache":
        pytest.skip("this transformers (< 5.24) still calls it past_key_values")
    cache = headinfer.HeadInferCache(model)
    with pytest.warns(FutureWarning, match="past_key_values") as record:
        out = model.generate(prompt(60), max_new_tokens=2, do_sample=False, past_key_values=cache)
    assert [Path(w.filename).name for w in record] == ["test_patch.py"]
    assert cache.get_seq_length() == out.shape[1] - 1
    with pytest.warns(FutureWarning, match="past_key_values") as record, torch.no_grad():
        model(prompt(10), past_key_values=headinfer.HeadInferCache(model))
    assert [Path(w.filename).name for w in record] == ["test_patch.py"]


def test_log_lines_do_not_repeat_the_logger_name(caplog: pytest.LogCaptureFixture) -> None:
    # The handler prints the logger's name ("headinfer: ..."); messages must not repeat it.
    model = tiny_model("llama")
    with caplog.at_level(logging.DEBUG, logger="headinfer"):
        headinfer.patch(model, chunk_size=64, block_size=16)
        with torch.no_grad():
            model(prompt(150))
        headinfer.unpatch(model)
    assert caplog.records
    assert not [r.getMessage() for r in caplog.records if r.getMessage().startswith("headinfer")]
