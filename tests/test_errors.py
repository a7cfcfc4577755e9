"""Clear errors for what headinfer does not do, raised before the cache is touched."""

from __future__ import annotations

import pytest
import torch
from _tiny import prompt, rel_err, tiny_model, twin

import headinfer
from headinfer import _core
from headinfer.prefill import cache_kwarg_name


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return headinfer.patch(tiny_model("llama"), chunk_size=64, block_size=16)


def test_error_hierarchy() -> None:
    assert headinfer.HeadInferError is _core.HeadInferError
    assert headinfer.OutOfHostMemoryError is _core.OutOfHostMemoryError
    assert issubclass(headinfer.OutOfHostMemoryError, headinfer.HeadInferError)
    assert issubclass(headinfer.UnsupportedModelError, headinfer.HeadInferError)
    assert issubclass(headinfer.GpuNotSupportedError, NotImplementedError)


def test_batch_larger_than_one(model: torch.nn.Module) -> None:
    ids = torch.cat([prompt(20), prompt(20, seed=2)])
    with pytest.raises(ValueError, match=r"input_ids.*batch size 2"):
        model(ids)
    with pytest.raises(ValueError, match=r"input_ids.*batch size 2"):
        model.generate(ids, max_new_tokens=2)
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match=r"inputs_embeds.*batch size 2"):
        model(inputs_embeds=embeds)


def test_padding_mask(model: torch.nn.Module) -> None:
    ids = prompt(20)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="attention_mask.*padding"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 20, 20))


def test_output_attentions(model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="output_attentions"):
        model(prompt(20), output_attentions=True)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_past_max_positions_as_transformers(family: str) -> None:
    # transformers runs RoPE models past max_position_embeddings (generate() logs a reminder
    # and goes on); so does headinfer, in prefill and in decode, and loses no token.
    model = tiny_model(family)  # max_position_embeddings=512
    reference = twin(model)
    headinfer.patch(model, chunk_size=64, block_size=16)
    ids = prompt(300)
    cache = headinfer.HeadInferCache(model)
    kw = {cache_kwarg_name(model): cache}
    more = prompt(300, seed=9)
    with torch.no_grad():
        model(ids, **kw)
        got = model(more, **kw).logits
        want = reference(torch.cat([ids, more], 1)).logits[:, 300:]
    assert cache.get_seq_length() == 600
    assert rel_err(got, want) < 1e-4


def test_generate_past_max_positions_as_transformers() -> None:
    model = tiny_model("llama", max_position_embeddings=40)
    reference = twin(model)
    headinfer.patch(model, chunk_size=16, block_size=16)
    got = model.generate(prompt(36), max_new_tokens=10, do_sample=False)
    want = reference.generate(prompt(36), max_new_tokens=10, do_sample=False)
    assert got.shape == (1, 46)
    assert torch.equal(got, want)


def test_custom_4d_mask_to_attention_function_rejected() -> None:
    from headinfer.attention import headinfer_attention

    module = tiny_model("llama").model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with pytest.raises(headinfer.HeadInferError, match="mask"):
        headinfer_attention(module, q, kv, kv, torch.zeros(1, 1, 3, 3))


def test_attention_function_in_training_mode_with_dropout() -> None:
    from headinfer.attention import headinfer_attention

    module = tiny_model("llama").model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with pytest.raises(headinfer.HeadInferError, match="dropout"):
        headinfer_attention(module, q, kv, kv, None, dropout=0.1)


def test_wrong_dtype_in_cache_update_names_argument() -> None:
    cache = headinfer.HeadInferCache(tiny_model("llama"))  # float32 store
    k = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="key"):
        cache.update(k, k, 0)
    assert cache.get_seq_length() == 0


def test_cuda_without_driver_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import headinfer.device
    from headinfer import _core
    from headinfer.device import check_device

    if _core.cuda_status() is None:
        # The driver and NVRTC load here: stand in a host where they do not, as the probe
        # would report it, so the refusal is tested on every machine.
        missing = "libnvrtc.so: cannot open shared object file (stand-in)"
        monkeypatch.setattr(headinfer.device, "cuda_missing", lambda: missing)

    class FakeCuda:
        device = torch.device("cuda", 0)

    with pytest.raises(headinfer.GpuNotSupportedError, match="input_ids.*cannot use it"):
        check_device(FakeCuda(), "input_ids")  # type: ignore[arg-type]


def test_other_devices_are_refused_by_name() -> None:
    from headinfer.device import check_device

    with pytest.raises(ValueError, match="input_ids: headinfer runs on CPU or CUDA"):
        check_device(torch.empty(1, device="meta"), "input_ids")


def test_same_results_after_errors(model: torch.nn.Module) -> None:
    # None of the rejected calls above left state behind in the shared, patched model.
    reference = twin(model)
    headinfer.unpatch(reference)
    with torch.no_grad():
        assert rel_err(model(prompt(130)).logits, reference(prompt(130)).logits) < 1e-4


def test_static_cache_rejected(model: torch.nn.Module) -> None:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match="static"):
        model(prompt(10), **{cache_kwarg_name(model): cache})
    with pytest.raises(ValueError, match="static"):
        model.generate(prompt(10), max_new_tokens=2, cache_implementation="static")
