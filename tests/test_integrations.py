"""longattn.integrations.transformers.swap_attention on tiny randomly initialised models.

Everything is built from configs (no downloads) and runs on CPU in a few seconds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn.integrations.transformers import (  # noqa: E402
    HeadRMSNormLinear,
    LongAttnCacheLayer,
    LongAttnSelfAttention,
    swap_attention,
)
from transformers.cache_utils import DynamicLayer  # noqa: E402

KINDS = ["nsa", "lightning", "rat", "landmark"]
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
# small sizes so that T ~ 40 crosses several blocks / windows / chunks
OPTS = {
    "nsa": {"kernel_size": 4, "kernel_stride": 2, "block_size": 8, "topk": 2, "window_size": 8},
    "lightning": {},
    "rat": {"chunk_size": 8},
    "landmark": {"block_size": 8},
}
H, HKV, D, HIDDEN, VOCAB = 4, 2, 16, 64, 128


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are tiny: intra-op threads only add synchronisation, which turns into minutes
    on a loaded machine. One thread for this module, restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(arch: str, layers: int = 2, theta: float = 5000.0):
    torch.manual_seed(0)
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": H,
        "num_key_value_heads": HKV,
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": None,
        "tie_word_embeddings": False,
    }
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=D, **kw))
    elif arch == "mistral":  # its default sliding_window (4096) is longer than the tests' T
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    else:
        raise AssertionError(arch)
    return model.eval()


def swap(model, kind, **kw):
    """swap_attention, without the warning about Qwen3's dropped q/k norms (tested apart)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return swap_attention(model, kind, **{**OPTS[kind], **kw})


def ids(batch=2, length=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def greedy(model, prompt, new=24, **kw):
    return model.generate(
        prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None, **kw
    )


def repeat_kv(w, groups=H // HKV):
    return w.unflatten(0, (HKV, -1)).repeat_interleave(groups, dim=0).flatten(0, 1)


# --------------------------------------------------------------------------- weight reuse


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_swap_reuses_weights(arch, kind):
    model = make_model(arch)
    orig = [copy.deepcopy(layer.self_attn) for layer in model.model.layers]
    assert swap(model, kind) is model
    for layer, o in zip(model.model.layers, orig, strict=True):
        w = layer.self_attn
        assert isinstance(w, LongAttnSelfAttention) and w.kind == kind
        m = w.attn
        if kind in ("nsa", "landmark"):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert torch.equal(getattr(m, name).weight, getattr(o, name).weight), name
                src_b, dst_b = getattr(o, name).bias, getattr(m, name).bias
                if src_b is not None:
                    assert torch.equal(dst_b, src_b), name
                elif dst_b is not None:  # qwen2: o_proj has no bias, the module's starts at 0
                    assert not dst_b.any(), name
            if arch == "qwen3":
                assert isinstance(m.q_proj, HeadRMSNormLinear)
                assert torch.equal(m.q_proj.norm.weight, o.q_norm.weight)
                assert torch.equal(m.k_proj.norm.weight, o.k_norm.weight)
            assert set(w.reused) >= {"q_proj", "k_proj", "v_proj", "o_proj"}
        elif kind == "lightning":
            qkv = m.qkv_proj.weight.view(H, 3, D, HIDDEN)
            assert torch.equal(qkv[:, 0], o.q_proj.weight.view(H, D, HIDDEN))
            assert torch.equal(qkv[:, 1], repeat_kv(o.k_proj.weight).view(H, D, HIDDEN))
            assert torch.equal(qkv[:, 2], repeat_kv(o.v_proj.weight).view(H, D, HIDDEN))
            if o.q_proj.bias is not None:
                b = m.qkv_proj.bias.view(H, 3, D)
                assert torch.equal(b[:, 0], o.q_proj.bias.view(H, D))
                assert torch.equal(b[:, 1], repeat_kv(o.k_proj.bias).view(H, D))
            assert torch.equal(m.out_proj.weight, o.o_proj.weight)
        else:  # rat: in_proj rows [z | v | g | q | k]
            v_rows = m.in_proj.weight[HIDDEN : 2 * HIDDEN]
            assert torch.equal(v_rows, repeat_kv(o.v_proj.weight))
            if o.v_proj.bias is not None:
                assert torch.equal(m.in_proj.bias[HIDDEN : 2 * HIDDEN], repeat_kv(o.v_proj.bias))
            assert torch.equal(m.out_proj.weight, o.o_proj.weight)
            assert w.reused == ("v_proj", "o_proj")
        # dtype / device kept
        p = next(m.parameters())
        assert p.dtype == o.q_proj.weight.dtype and p.device == o.q_proj.weight.device
    text = repr(model.model.layers[1].self_attn)
    assert text.startswith(f"LongAttnSelfAttention(\n  kind='{kind}', layer_idx=1, reused=[")
    assert type(model.model.layers[1].self_attn.attn).__name__ in text


@pytest.mark.parametrize("arch", ARCHS)
def test_landmark_single_block_equals_original(arch):
    """Landmark with block_size > T is plain causal softmax attention: the swapped model must
    give the original logits, which checks the reused projections, GQA mapping, RoPE theta,
    Qwen2's biases and Qwen3's q/k norms end to end."""
    model = make_model(arch, theta=5000.0)
    x = ids(length=40)
    with torch.no_grad():
        want = model(x).logits
        swap_attention(model, "landmark", block_size=64)
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_qwen3_norms_dropped_warns():
    for kind in ("lightning", "rat"):
        with pytest.warns(UserWarning, match="q_norm"):
            swap_attention(make_model("qwen3"), kind, **OPTS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swap_attention(make_model("qwen3"), "nsa", **OPTS["nsa"])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_backward_loss_decreases(arch, kind):
    model = swap(make_model(arch), kind).train()
    x = ids(length=40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        out = model(x, labels=x)
        assert torch.isfinite(out.logits).all()
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for name, p in model.model.layers[0].self_attn.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_cache_matches_no_cache(arch, kind):
    model = swap(make_model(arch), kind)
    prompt = ids(length=16)
    out = greedy(model, prompt, use_cache=True, return_dict_in_generate=True)
    no_cache = greedy(model, prompt, use_cache=False)
    assert torch.equal(out.sequences, no_cache)
    total = out.sequences.shape[1]
    cache = out.cache
    assert cache.get_seq_length() == total - 1  # the last token is never fed back
    for slot in cache.layers:
        assert isinstance(slot, LongAttnCacheLayer) and slot.kind == kind
        assert slot.seen == total - 1 and slot.state is not None
    # a new generate() call makes a new cache: same tokens again
    assert torch.equal(greedy(model, prompt, use_cache=True), no_cache)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_cache_matches_no_cache(kind):
    model = swap(make_model("llama"), kind)
    prompt = ids(length=12)
    with_cache = greedy(model, prompt, new=12, num_beams=3, use_cache=True)
    without = greedy(model, prompt, new=12, num_beams=3, use_cache=False)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [[1, 3], [0, 1, 2]])
def test_hybrid_layers(kind, layers):
    model = make_model("llama", layers=4)
    before = [layer.self_attn for layer in model.model.layers]
    swap(model, kind, layers=layers)
    for i, layer in enumerate(model.model.layers):
        if i in layers:
            assert isinstance(layer.self_attn, LongAttnSelfAttention)
            assert layer.self_attn.layer_idx == i
        else:
            assert layer.self_attn is before[i]  # untouched full attention
    prompt = ids(length=16)
    out = greedy(model, prompt, use_cache=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(model, prompt, use_cache=False))
    total = out.sequences.shape[1]
    assert out.cache.get_seq_length() == total - 1
    for i, slot in enumerate(out.cache.layers):
        if i in layers:
            assert isinstance(slot, LongAttnCacheLayer) and slot.seen == total - 1
        else:
            assert isinstance(slot, DynamicLayer) and slot.keys.shape[-2] == total - 1


def test_prefill_in_pieces_with_explicit_cache():
    """model(x[:, :a], cache) then model(x[:, a:], cache) equals model(x) (mixed hybrid)."""
    model = make_model("llama", layers=3)
    swap(model, "nsa", layers=[0])
    swap(model, "lightning", layers=[2])
    x = ids(length=37)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = transformers.DynamicCache(config=model.config)
        a = model(x[:, :20], cache=cache, use_cache=True).logits
        b = model(x[:, 20:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 37
    assert [type(s).__name__ for s in cache.layers] == [
        "LongAttnCacheLayer", "DynamicLayer", "LongAttnCacheLayer",
    ]  # fmt: skip


# --------------------------------------------------------------------------- errors


def test_bad_kind_raises():
    with pytest.raises(ValueError, match="kind"):
        swap_attention(make_model("llama"), "flash")


@pytest.mark.parametrize("layers", [[2], [-3], ["0"], [1.0], [True], 1, []])
def test_bad_layer_index_raises(layers):
    with pytest.raises(ValueError, match="layers"):
        swap_attention(make_model("llama"), "lightning", layers=layers)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown or derived"):
        swap_attention(make_model("llama"), "nsa", blocksize=8)
    with pytest.raises(ValueError, match="head_dim"):
        swap_attention(make_model("llama"), "landmark", head_dim=8)
    model = make_model("llama")
    swap_attention(model, "rat", layers=[0], chunk_size=8)
    with pytest.raises(ValueError, match="already swapped"):
        swap_attention(model, "nsa", layers=[0, 1])
    assert not isinstance(model.model.layers[1].self_attn, LongAttnSelfAttention)
    # RAT needs num_heads * head_dim == hidden_size to reuse v_proj / o_proj
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        swap(transformers.Qwen3ForCausalLM(cfg), "rat")


def test_padding_and_positions_raise():
    model = swap(make_model("llama"), "lightning", layers=[0])
    x = ids(length=10)
    ones = torch.ones_like(x)
    model(x, attention_mask=ones)  # an all-ones mask is fine
    left = ones.clone()
    left[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(x, attention_mask=left)
    with pytest.raises(ValueError, match="padding"):
        greedy(model, x, new=2, attention_mask=left)
    causal = torch.ones(10, 10).tril().bool()[None, None].expand(2, 1, 10, 10)
    model(x, attention_mask=causal)  # the plain causal 4D mask is fine
    with pytest.raises(ValueError, match="4D"):
        model(x, attention_mask=torch.ones(2, 1, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.arange(10)[None] + 5)
    packed = torch.cat([torch.arange(5), torch.arange(5)])[None].expand(2, -1)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=packed)


def test_static_cache_raises():
    model = swap(make_model("llama"), "nsa", layers=[1])
    with pytest.raises(ValueError, match="DynamicCache"):
        greedy(model, ids(length=8), new=2, cache_implementation="static")


def test_layer_without_projections_raises():
    model = make_model("llama")
    del model.model.layers[1].self_attn.v_proj
    with pytest.raises(ValueError, match="v_proj"):
        swap_attention(model, "landmark", block_size=8)
    assert not isinstance(model.model.layers[0].self_attn, LongAttnSelfAttention)  # all or none


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_model(kind):
    model = swap(make_model("llama").to(torch.bfloat16), kind)
    assert (
        model.model.layers[0].self_attn.attn.out_proj.weight.dtype == torch.bfloat16
        if (kind in ("lightning", "rat"))
        else model.model.layers[0].self_attn.attn.o_proj.weight.dtype == torch.bfloat16
    )
    logits = model(ids(length=24)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert greedy(model, ids(length=8), new=8).shape == (2, 16)


def test_landmark_logits_processor_keeps_the_layout():
    from longattn import insert_landmarks, remove_landmarks
    from longattn.integrations.transformers import LandmarkLogitsProcessor

    bs, lm = 8, VOCAB - 1
    model = swap(make_model("llama"), "landmark", block_size=bs)
    prompt = insert_landmarks(
        ids(length=12) % (VOCAB - 1), landmark_id=lm, block_size=bs
    )  # 12 tokens -> 13 with one lm
    procs = transformers.LogitsProcessorList([LandmarkLogitsProcessor(lm, bs)])
    out = greedy(model, prompt, new=27, logits_processor=procs)
    pos = torch.arange(out.shape[1])
    assert torch.equal(out == lm, ((pos % bs) == bs - 1).expand_as(out))
    assert torch.equal(out, greedy(model, prompt, new=27, logits_processor=procs, use_cache=False))
    assert not (remove_landmarks(out, block_size=bs, dim=1) == lm).any()
