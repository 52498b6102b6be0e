"""longattn in transformers the conventional way: the attention functions registered in
``AttentionInterface`` ("longattn_sliding_window", "longattn_landmark"), the model's own RoPE in
swapped modules, and save_pretrained / from_pretrained of swapped models.

Tiny random models built from configs (no downloads), on CPU, a few seconds in all; on a GPU,
generation from a 16K-token prompt with the cache for every mechanism.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from harness import cuda_only  # noqa: E402
from longattn import insert_landmarks  # noqa: E402
from longattn.integrations import transformers as lt  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
IMPLS = ["longattn_sliding_window", "longattn_landmark"]
H, HKV, D, HIDDEN, VOCAB = 4, 2, 16, 64, 128
T = 40
CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 5000.0}
ROPES = {
    "llama3": {
        "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    },
    "yarn": {
        "rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}  # fmt: skip
# options that reduce each mechanism to plain causal attention over T tokens
DENSE = {
    "longattn_sliding_window": {"longattn_window_size": 64},
    "longattn_landmark": {"longattn_landmark_block_size": 64},
}
# options under which each mechanism differs from dense attention over T tokens
SPARSE = {
    "longattn_sliding_window": {"longattn_window_size": 6},
    "longattn_landmark": {"longattn_landmark_block_size": 8},
}
SWAP_OPTS = {
    "nsa": {"kernel_size": 4, "kernel_stride": 2, "block_size": 8, "topk": 2, "window_size": 8},
    "lightning": {},
    "rat": {"chunk_size": 8},
    "landmark": {"block_size": 8},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add synchronisation. One thread for this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_config(arch: str, rope: dict | None = None, layers: int = 2, **extra):
    kw = {
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": H,
        "num_key_value_heads": HKV,
        "max_position_embeddings": 256,
        "rope_parameters": dict(rope or DEFAULT_ROPE),
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": None,
        "tie_word_embeddings": False,
    }
    if arch == "qwen3":
        kw["head_dim"] = D
    if arch == "mistral":
        kw["sliding_window"] = None  # Mistral's default is 4096; tests that want one pass it
    kw.update(extra)
    return getattr(transformers, CONFIG_CLASSES[arch])(**kw)


def build(config, impl: str = "eager"):
    """The same weights for every implementation (same seed, same config)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    return model.eval()


def ids(batch=2, length=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def greedy(model, prompt, new=5, **kw):
    return model.generate(
        prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None, **kw
    )


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def swap(model, kind, **kw):
    with warnings.catch_warnings():  # Qwen3's q/k norms dropped by lightning / rat (tested apart)
        warnings.simplefilter("ignore")
        return lt.swap_attention(model, kind, **{**SWAP_OPTS[kind], **kw})


# ------------------------------------------------------------------------- attention functions


def test_registered():
    for name in IMPLS:
        assert (
            transformers.AttentionInterface._global_mapping[name] is lt.ATTN_IMPLEMENTATIONS[name]
        )
        assert AttentionMaskInterface._global_mapping[name] is lt.longattn_attention_mask
    model = build(make_config("llama"), "longattn_landmark")
    assert model.config._attn_implementation == "longattn_landmark"
    assert model.model.layers[0].self_attn.config._attn_implementation == "longattn_landmark"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_dense_case_equals_eager(arch, impl):
    """A window / landmark block longer than the sequence is plain causal attention: the logits
    equal the eager model's (same weights), GQA and Qwen2 biases / Qwen3 norms included; with a
    short window / block they do not (the function is the one that runs)."""
    x = ids()
    want = logits(build(make_config(arch, **DENSE[impl])), x)
    got = logits(build(make_config(arch, **DENSE[impl]), impl), x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    sparse = logits(build(make_config(arch, **SPARSE[impl]), impl), x)
    assert not torch.allclose(sparse, want, atol=1e-3, rtol=1e-3)
    # the first tokens see the same keys either way
    n = 5 if impl == "longattn_sliding_window" else 7
    torch.testing.assert_close(sparse[:, :n], want[:, :n], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_rope_scaling_equals_eager(rope, impl):
    """The model applies its (scaled) RoPE before the attention function: llama3 / yarn scaling
    gives the eager model's logits with the same scaling, which differ from unscaled RoPE."""
    x = ids()
    scaled = make_config("llama", ROPES[rope], **DENSE[impl])
    want = logits(build(scaled), x)
    torch.testing.assert_close(logits(build(scaled, impl), x), want, atol=2e-5, rtol=1e-4)
    plain = logits(build(make_config("llama", **DENSE[impl])), x)
    assert not torch.allclose(plain, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("window", [8, 13])
def test_mistral_sliding_window_equals_eager(window):
    """Mistral with config.sliding_window: the window comes from the model's config, forward and
    cached generation (its sliding-window cache keeps only the last W - 1 keys) give eager's."""
    cfg = make_config("mistral", sliding_window=window)
    eager, ours = build(cfg), build(cfg, "longattn_sliding_window")
    x = ids()
    torch.testing.assert_close(logits(ours, x), logits(eager, x), atol=2e-5, rtol=1e-4)
    prompt = ids(length=12)
    out = greedy(ours, prompt, new=10, return_dict_in_generate=True)
    assert type(out.cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"
    assert torch.equal(out.sequences, greedy(eager, prompt, new=10))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # left padding, through the sliding-window cache
    want = greedy(eager, prompt, new=10, attention_mask=mask)
    assert torch.equal(greedy(ours, prompt, new=10, attention_mask=mask), want)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", IMPLS)
def test_generate_cache_matches_recompute(arch, impl):
    """generate() with the model's DynamicCache (decode steps see Tq = 1 < Tk keys) gives the
    tokens of a cache-free recompute of the whole sequence at every step."""
    model = build(make_config(arch, **SPARSE[impl]), impl)
    prompt = ids(length=14)
    out = greedy(model, prompt, new=5, use_cache=True, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 19)
    assert out.cache.get_seq_length() == 18
    assert torch.equal(out.sequences, greedy(model, prompt, new=5, use_cache=False))
    # and each greedy token is the argmax of a full forward over the tokens before it
    full = logits(model, out.sequences[:, :-1])
    assert torch.equal(full[:, 13:].argmax(-1), out.sequences[:, 14:])


def test_chunked_prefill_with_cache():
    """Prefill in two pieces through the cache (Tq > 1 < Tk) equals one forward."""
    for impl in IMPLS:
        model = build(make_config("llama", **SPARSE[impl]), impl)
        x = ids(length=37)
        full = logits(model, x)
        cache = transformers.DynamicCache(config=model.config)
        a = logits(model, x[:, :20], cache=cache, use_cache=True)
        b = logits(model, x[:, 20:], cache=cache, use_cache=True)
        torch.testing.assert_close(torch.cat([a, b], 1), full, atol=2e-5, rtol=1e-4)


def test_landmark_topk_retrieval():
    """config.longattn_landmark_topk: retrieval in every call, so cached generation equals the
    cache-free recompute; with topk >= the number of blocks it is the training-mode forward."""
    base = {"longattn_landmark_block_size": 4}
    x = ids()
    dense = logits(build(make_config("llama", **base), "longattn_landmark"), x)
    every = build(make_config("llama", longattn_landmark_topk=16, **base), "longattn_landmark")
    torch.testing.assert_close(logits(every, x), dense, atol=2e-5, rtol=1e-4)
    model = build(make_config("llama", longattn_landmark_topk=2, **base), "longattn_landmark")
    assert not torch.allclose(logits(model, x), dense, atol=1e-3, rtol=1e-3)
    prompt = ids(length=20)
    assert torch.equal(greedy(model, prompt, new=6), greedy(model, prompt, new=6, use_cache=False))


def test_landmark_layout_in_generation():
    """insert_landmarks prompts + LandmarkLogitsProcessor keep the landmark layout."""
    bs, lm = 8, VOCAB - 1
    model = build(make_config("qwen2", longattn_landmark_block_size=bs), "longattn_landmark")
    prompt = insert_landmarks(ids(length=12) % lm, landmark_id=lm, block_size=bs)
    procs = transformers.LogitsProcessorList([lt.LandmarkLogitsProcessor(lm, bs)])
    out = greedy(model, prompt, new=19, logits_processor=procs)
    pos = torch.arange(out.shape[1])
    assert torch.equal(out == lm, ((pos % bs) == bs - 1).expand_as(out))
    assert torch.equal(out, greedy(model, prompt, new=19, logits_processor=procs, use_cache=False))


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_and_packing(impl):
    """Left-padded generation, right-padded forwards and packed sequences (position ids that
    restart) give each sequence's own result."""
    model = build(make_config("llama", **SPARSE[impl]), impl)
    p0, p1 = ids(1, 9, seed=2), ids(1, 13, seed=3)
    lone0, lone1 = logits(model, p0), logits(model, p1)

    left = torch.zeros(2, 13, dtype=torch.long)
    left[0, 4:], left[1] = p0, p1
    mask = torch.ones_like(left)
    mask[0, :4] = 0
    out = greedy(model, left, new=6, attention_mask=mask)
    assert torch.equal(out[0, 4:], greedy(model, p0, new=6)[0])
    assert torch.equal(out[1], greedy(model, p1, new=6)[0])

    right = torch.zeros(2, 13, dtype=torch.long)
    right[0, :9], right[1] = p0, p1
    mask = torch.ones_like(right)
    mask[0, 9:] = 0
    got = logits(model, right, attention_mask=mask)
    torch.testing.assert_close(got[0, :9], lone0[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], lone1[0], atol=2e-5, rtol=1e-4)

    packed = torch.cat([p0, p1], dim=1)
    pos = torch.cat([torch.arange(9), torch.arange(13)])[None]
    got = logits(model, packed, position_ids=pos)
    torch.testing.assert_close(got[0, :9], lone0[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[0, 9:], lone1[0], atol=2e-5, rtol=1e-4)
    # two packed rows at once
    rows = torch.cat([packed, torch.cat([p1, p0], dim=1)])
    pos2 = torch.cat([pos, torch.cat([torch.arange(13), torch.arange(9)])[None]])
    got = logits(model, rows, position_ids=pos2)
    torch.testing.assert_close(got[1, :13], lone1[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, 13:], lone0[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward(impl):
    model = build(make_config("qwen2", **SPARSE[impl]), impl).train()
    x = ids(length=24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        g = model.model.layers[0].self_attn.q_proj.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses


def test_options_and_errors():
    x = ids(length=10)
    # W from longattn_window_size over the model's sliding_window; larger than it is refused
    cfg = make_config("mistral", sliding_window=8, longattn_window_size=4)
    want = logits(build(make_config("mistral", sliding_window=4)), x)
    torch.testing.assert_close(
        logits(build(cfg, "longattn_sliding_window"), x), want, atol=2e-5, rtol=1e-4
    )
    with pytest.raises(ValueError, match="larger than the model's"):
        build(make_config("mistral", sliding_window=8, longattn_window_size=9), IMPLS[0])(x)
    with pytest.raises(ValueError, match="sliding_window = None"):
        build(make_config("mistral", sliding_window=8), "longattn_landmark")(x)
    for name, bad in (("longattn_window_size", 0), ("longattn_landmark_block_size", 1)):
        impl = IMPLS[0] if "window" in name else IMPLS[1]
        with pytest.raises(ValueError, match=name):
            build(make_config("llama", **{name: bad}), impl)(x)
    for impl in IMPLS:
        model = build(make_config("llama", attention_dropout=0.1), impl)
        model(x)  # eval: no dropout requested
        with pytest.raises(ValueError, match="dropout"):
            model.train()(x)
        model = build(make_config("llama"), impl)
        with pytest.raises(ValueError, match="4D"):
            model(x, attention_mask=torch.ones(2, 1, 10, 10, dtype=torch.bool))
        holes = torch.ones(2, 10, dtype=torch.long)
        holes[0, 4] = 0
        with pytest.raises(ValueError, match="holes"):
            model(x, attention_mask=holes)
        with pytest.raises(ValueError, match="DynamicCache"):
            greedy(model, x, new=2, cache_implementation="static")


# ---------------------------------------------------------------------- swapped modules: RoPE


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_model_rotary_equals_transformers_rope(rope):
    """ModelRotary (the swapped nsa / landmark modules' RoPE) is the model's apply_rotary_pos_emb
    with its rotary embedding's cos / sin, at shared, per-row and per-head positions."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = build(make_config("llama", ROPES[rope]))
    rot = lt.ModelRotary(model.model.rotary_emb)
    x = torch.randn(2, 7, 3, D)
    pos = torch.tensor([[0, 1, 5, 9, 40, 100, 200], [3, 2, 1, 0, 17, 63, 64]])
    cos, sin = model.model.rotary_emb(x, pos)
    want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
    torch.testing.assert_close(rot(x, pos), want.transpose(1, 2), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rot(x[:1], pos[0]), want[:1].transpose(1, 2), atol=1e-6, rtol=1e-5)
    per_head = pos[:, :, None].expand(2, 7, 3)
    torch.testing.assert_close(rot(x, per_head), want.transpose(1, 2), atol=1e-6, rtol=1e-5)
    plain = lt.ModelRotary(build(make_config("llama")).model.rotary_emb)
    assert not torch.allclose(plain(x, pos), want.transpose(1, 2), atol=1e-3)


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("kind", ["nsa", "landmark"])
def test_swapped_modules_use_model_rope(rope, kind):
    """Swapped nsa / landmark layers reduced to dense causal attention (landmark: one block; nsa:
    window >= T, gates forced to the window branch) give the eager model's logits with the same
    rope scaling: the model's scaled RoPE is the one applied, without a warning."""
    cfg = make_config("llama", ROPES[rope])
    x = ids()
    want = logits(build(cfg), x)
    model = build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if kind == "landmark":
            lt.swap_attention(model, "landmark", block_size=64)
        else:
            lt.swap_attention(model, "nsa", kernel_size=4, kernel_stride=2, block_size=8,
                              topk=2, window_size=64)  # fmt: skip
    for layer in model.model.layers:
        attn = layer.self_attn.attn
        assert isinstance(attn.rotary, lt.ModelRotary)
        assert attn.rotary.rotary_emb is model.model.rotary_emb
        if kind == "nsa":  # gates: compressed 0, selected 0, window 1
            g = torch.nn.Linear(HIDDEN, 3 * H, bias=True)
            with torch.no_grad():
                g.weight.zero_()
                g.bias.copy_(torch.tensor([-40.0, -40.0, 40.0]).repeat(H))
            attn.g_proj = g
    torch.testing.assert_close(logits(model, x), want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(logits(build(make_config("llama")), x), want, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------- swapped modules: save / load


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", sorted(SWAP_OPTS))
def test_swap_round_trip(arch, kind, tmp_path):
    """swap -> train a step (so the weights differ from the copies a swap would make) ->
    save_pretrained -> longattn's from_pretrained: the config records the swap, the loaded model is
    a plain instance of the model class with the swapped modules, and gives identical logits and
    generations; forward / backward run on it."""
    model = swap(build(make_config(arch)), kind, layers=[1] if arch == "qwen2" else None)
    x = ids(length=24)
    model.train()
    model(x, labels=x).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad.sign())
    model.eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    layers = [1] if arch == "qwen2" else [0, 1]
    assert saved["longattn_swaps"] == [{"kind": kind, "layers": layers, "options": SWAP_OPTS[kind]}]

    loaded, info = lt.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for i, layer in enumerate(loaded.model.layers):
        assert isinstance(layer.self_attn, lt.LongAttnSelfAttention) == (i in layers)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), atol=0, rtol=0)
    assert torch.equal(logits(loaded, x), logits(model, x))
    prompt = ids(length=10)
    out = greedy(loaded, prompt)
    assert torch.equal(out, greedy(model, prompt))
    assert torch.equal(out, greedy(loaded, prompt, use_cache=False))
    loaded.train()
    loaded(x, labels=x).loss.backward()
    grads = [p.grad for p in loaded.model.layers[1].self_attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the saved config loads again with the swap recorded once
    assert loaded.config.longattn_swaps == saved["longattn_swaps"]


def test_round_trip_hybrid_with_attention_function(tmp_path):
    """Two swaps on different layers of a model whose other layers run a longattn attention
    function: all of it survives save / load (the attn_implementation is passed again on load,
    as transformers does not save it)."""
    cfg = make_config("llama", layers=3, longattn_window_size=6)
    model = build(cfg, "longattn_sliding_window")
    swap(model, "nsa", layers=[0])
    swap(model, "lightning", layers=[2])
    model.save_pretrained(tmp_path)
    loaded = lt.from_pretrained(tmp_path, attn_implementation="longattn_sliding_window")
    assert [getattr(layer.self_attn, "kind", None) for layer in loaded.model.layers] == [
        "nsa", None, "lightning",
    ]  # fmt: skip
    assert loaded.config.longattn_window_size == 6
    x = ids(length=30)
    assert torch.equal(logits(loaded, x), logits(model, x))
    slopes = loaded.model.layers[2].self_attn.attn.slopes
    assert torch.equal(slopes, model.model.layers[2].self_attn.attn.slopes)
    prompt = ids(length=9)
    assert torch.equal(greedy(loaded, prompt), greedy(model, prompt))


def test_from_pretrained_without_swaps_options_and_dtype(tmp_path):
    model = build(make_config("qwen3"))
    model.save_pretrained(tmp_path / "plain")
    loaded = lt.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))
    # longattn_* keyword arguments go to the config
    impl = "longattn_sliding_window"
    loaded = lt.from_pretrained(
        tmp_path / "plain", attn_implementation=impl, longattn_window_size=6
    )
    assert loaded.config.longattn_window_size == 6
    want = logits(build(make_config("qwen3", longattn_window_size=6), impl), ids())
    assert torch.equal(logits(loaded, ids()), want)
    swap(model, "nsa")
    model.save_pretrained(tmp_path / "nsa")
    half = lt.from_pretrained(tmp_path / "nsa", dtype=torch.bfloat16)
    attn = half.model.layers[0].self_attn.attn
    assert attn.g_proj.weight.dtype == torch.bfloat16
    assert torch.equal(attn.g_proj.weight, model.model.layers[0].self_attn.attn.g_proj.weight.to(
        torch.bfloat16))  # fmt: skip
    assert torch.isfinite(logits(half, ids())).all()


def test_bad_recorded_swaps_raise(tmp_path):
    model = build(make_config("llama"))
    model.config.longattn_swaps = [{"kind": "flash", "layers": [0], "options": {}}]
    model.save_pretrained(tmp_path / "flash")
    with pytest.raises(ValueError, match="kind"):
        lt.from_pretrained(tmp_path / "flash")
    # a swap recorded on a checkpoint that holds the original attention weights
    model.config.longattn_swaps = [{"kind": "nsa", "layers": [0], "options": {}}]
    model.save_pretrained(tmp_path / "nsa")
    with pytest.raises(ValueError, match="no weights for the swapped"):
        lt.from_pretrained(tmp_path / "nsa")
    with pytest.raises(ValueError, match="swap_attention"):
        lt.from_pretrained(tmp_path / "flash", longattn_swaps=[])
    with pytest.raises(ValueError, match="JSON"):
        lt.swap_attention(build(make_config("llama")), "rat", chunk_size=torch.tensor(8))


# ------------------------------------------------------------------------- long context on a GPU

LONG = 16384
# every mechanism sparse at 16K: windows, blocks and top-k far below the prompt
LONG_SWAPS = {
    "nsa": {
        "kernel_size": 32,
        "kernel_stride": 16,
        "block_size": 64,
        "topk": 4,
        "window_size": 256,
    },
    "lightning": {},
    "rat": {"chunk_size": 16},
    "landmark": {"block_size": 64},
}
LONG_FUNCTIONS = {
    "longattn_sliding_window": {"longattn_window_size": 256},
    "longattn_landmark": {"longattn_landmark_block_size": 64, "longattn_landmark_topk": 4},
}


@cuda_only
@pytest.mark.parametrize("kind", sorted(LONG_SWAPS) + sorted(LONG_FUNCTIONS))
def test_cuda_generate_from_16k_prompt(kind):
    """A tiny Llama on the GPU (float32: the kernels' 3xTF32 path) generates 8 tokens from a
    16K-token prompt with the cache, for every swapped module and attention function: each
    cached decode step's logits equal a cache-free forward over the whole sequence."""
    impl = kind if kind in LONG_FUNCTIONS else "eager"
    cfg = make_config("llama", max_position_embeddings=LONG + 64, **LONG_FUNCTIONS.get(kind, {}))
    model = build(cfg, impl)
    if kind in LONG_SWAPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lt.swap_attention(model, kind, **LONG_SWAPS[kind])
    model = model.to("cuda")
    prompt = ids(batch=1, length=LONG).cuda()
    with torch.no_grad():
        out = greedy(
            model, prompt, new=8, use_cache=True, return_dict_in_generate=True, output_logits=True
        )
    assert out.sequences.shape == (1, LONG + 8)
    assert torch.equal(out.sequences[:, :LONG], prompt)
    steps = torch.stack(out.logits, dim=1)  # [1, 8, vocab]: the prefill's last row, then decodes
    full = logits(model, out.sequences[:, :-1])[:, LONG - 1 :]
    assert torch.isfinite(steps).all()
    torch.testing.assert_close(steps, full, atol=2e-4, rtol=1e-3)
