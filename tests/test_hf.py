"""Hugging Face transformers: tracing, the rules their models need (each with its property), exact merges."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import predict_through_onnx, raises, relative_error

import pleascc
from pleascc.passes.groups import analyze, permute_state, random_permutations
from pleascc.passes.spaces import Prod
from pleascc.trace import trace
from pleascc.verify import non_degenerate, permutation_invariance, permuted_copy

transformers = pytest.importorskip("transformers")

TOKENS, VOCAB = 8, 256


def _llama(seed: int = 0, **overrides):
    """Grouped-query attention (4 query heads reading 2 kv heads), RoPE, RMSNorm, SwiGLU."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, **overrides)
    return transformers.LlamaForCausalLM(config).eval()


def _config(name: str, **sizes):
    """A tiny random configuration (hidden 64, 2 layers, 4 heads, vocabulary 256, 32² images of 8² patches)."""
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name in ("ViT", "CLIPVision"):
        common.update(image_size=32, patch_size=8)
    elif name != "GPT2":
        common.update(vocab_size=VOCAB)
    return getattr(transformers, f"{name}Config")(**{**common, **sizes})


def _build(cls: str, config: str, **sizes):
    def build(seed: int):
        torch.manual_seed(seed)
        return getattr(transformers, cls)(_config(config, **sizes)).eval()
    return build


def _tokens(n):
    return torch.randint(0, VOCAB, (n, TOKENS))


def _images(n):
    return torch.randn(n, 3, 32, 32)


MODELS = {  # factory of a seed, inputs of n samples
    "llama-gqa": (_llama, _tokens),
    "gpt2": (lambda seed: _gpt2(seed), _tokens),
    "bert": (_build("BertForSequenceClassification", "Bert", max_position_embeddings=32, num_labels=3), _tokens),
    "qwen3": (_build("Qwen3ForCausalLM", "Qwen3", num_key_value_heads=2, head_dim=16), _tokens),
    "mistral": (_build("MistralForCausalLM", "Mistral", num_key_value_heads=2, sliding_window=4), _tokens),
    "vit": (_build("ViTForImageClassification", "ViT", num_labels=10), _images),
    "clip-vision": (_build("CLIPVisionModelWithProjection", "CLIPVision", projection_dim=32), _images),
}


def _gpt2(seed: int):
    """Conv1D layers, learned positions, input and output embeddings tied."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _model(name: str, seed: int = 0):
    factory, inputs = MODELS[name]
    return non_degenerate(factory(seed)), inputs


def _first(output) -> torch.Tensor:
    """A transformers output's first tensor (logits, embeddings): what the traced model returns."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _analysis(model, x):
    return analyze(trace(model), (x,))


def _factors(analysis, name: str, axis: int = 0) -> list:
    """The atoms of a parameter's axis, outermost first."""
    dim = analysis.table.resolve(analysis.params[name].dims[axis])
    return list(dim.factors) if isinstance(dim, Prod) else [dim]


# ----- the property on whole models


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_leaves_hf_models_unchanged(name):
    model, inputs = _model(name)
    x = inputs(2)
    with torch.no_grad():
        assert torch.allclose(trace(model)(x), _first(model(x)), atol=1e-5)  # the trace is the model
    result = permutation_invariance(model, x)
    assert result["relative_diff"] < 1e-10
    assert result["unsupported"] == []
    assert result["coverage"] > (0.99 if name == "qwen3" else 0.999)  # qk-norm's scales: over fixed head dims
    assert result["free_groups"] > 0


def test_grouped_query_heads_permute_as_blocks_and_rope_fixes_head_dims():
    """q's rows are (kv heads × queries per kv head × head dim); k's and v's (kv heads × head dim).  Under RoPE
    q's and k's head dims are fixed (each has its own frequency); v's is free, and so are the heads."""
    model, inputs = _model("llama-gqa")
    analysis = _analysis(model, inputs(2))
    table, attn = analysis.table, "model.layers.0.self_attn."
    kv, per_kv, q_dim = _factors(analysis, attn + "q_proj.weight")
    k_heads, k_dim = _factors(analysis, attn + "k_proj.weight")
    v_heads, v_dim = _factors(analysis, attn + "v_proj.weight")
    assert table.size(kv) == 2 and table.size(per_kv) == 2 and k_heads == v_heads == kv
    assert not table.is_fixed(kv) and not table.is_fixed(per_kv) and not table.is_fixed(v_dim)
    assert table.is_fixed(q_dim) and table.is_fixed(k_dim)
    assert analysis.per_head[per_kv.id] == kv.id  # queries permute within their kv group, per group
    vocab, width = analysis.params["model.embed_tokens.weight"].dims
    assert table.is_fixed(vocab) and not table.is_fixed(width)


def test_hf_rms_norm_becomes_a_norm_the_analysis_knows():
    """transformers writes RMSNorm as x·rsqrt(mean(x²)); opened into nn.RMSNorm, it is a feature norm that a
    merge wider than one model applies to each model's units apart."""
    model, inputs = _model("llama-gqa")
    gm = trace(model)
    assert sum(isinstance(m, nn.RMSNorm) for m in gm.modules()) == 5
    analysis = analyze(gm, (inputs(2),))
    assert {n.kind for n in analysis.feature_norms} == {"rms"} and len(analysis.feature_norms) == 5


def test_qk_norm_is_over_head_dims_that_rope_fixes():
    """Qwen3 normalises q and k per head (RMSNorm over the head dim, shared by all heads) before RoPE."""
    model, inputs = _model("qwen3")
    analysis = _analysis(model, inputs(2))
    table, attn = analysis.table, "model.layers.0.self_attn."
    (head_dim,) = analysis.params[attn + "q_norm.weight"].dims
    kv, per_kv, q_dim = _factors(analysis, attn + "q_proj.weight")
    assert table.resolve(head_dim) == table.resolve(q_dim) and table.is_fixed(head_dim)
    assert not table.is_fixed(kv) and not table.is_fixed(per_kv)


def test_gpt2_conv1d_is_a_layer_with_its_weight_stored_in_by_out():
    model, inputs = _model("gpt2")
    analysis = _analysis(model, inputs(2))
    layer = next(layer for layer in analysis.layers if layer.weight == "transformer.h.0.attn.c_attn.weight")
    rows, cols = analysis.params[layer.weight].dims
    assert rows == layer.in_dim and cols == layer.out_dim and analysis.params[layer.weight].roles == ["in", "out"]
    assert layer.unknowns(analysis) == 64 + 1
    tied = analysis.params["lm_head.weight"].dims[1], analysis.params["transformer.wte.weight"].dims[1]
    assert analysis.table.find(tied[0].id) == analysis.table.find(tied[1].id)


def test_padding_mask_is_an_input_the_permutation_leaves_alone():
    """Token models take an optional (batch, tokens) padding mask; permuting every free group moves nothing,
    whatever the mask, and the trace masks as transformers does."""
    model, inputs = _model("llama-gqa")
    ids, mask = inputs(2), torch.ones(2, TOKENS, dtype=torch.long)
    mask[0, -3:] = 0  # right padding: every token attends to some token (a row of -inf would be NaN)
    gm = trace(model)
    with torch.no_grad():
        assert torch.allclose(gm(ids, mask), model(ids, attention_mask=mask).logits, atol=1e-5)
    analysis = analyze(gm, (ids, mask))
    gm = copy.deepcopy(gm).double()
    with torch.no_grad():
        before = gm(ids, mask)
        gm.load_state_dict(permute_state(analysis, gm.state_dict(),
                                         random_permutations(analysis, torch.Generator().manual_seed(0))))
        assert relative_error(gm(ids, mask).numpy(), before) < 1e-10


def test_sizes_the_trace_assumed_are_checked_when_it_runs():
    """transformers branches on sizes in Python (ViT checks the image size); the trace takes the example's
    branch and asserts, when it runs, that its input would have taken the same."""
    model, _ = _model("vit")
    gm = trace(model)
    with pytest.raises(AssertionError, match="pleascc traced this model"):
        gm(torch.randn(1, 3, 48, 48))


def test_masks_pleascc_does_not_know_fail_closed():
    from pleascc import hf

    model, inputs = _model("llama-gqa")
    build = hf._BUILDERS["create_causal_mask"]
    raises("or_mask_function", build, model.config, torch.zeros(1, 4, 64), None, or_mask_function=lambda *a: True)


class _Branching(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_an_untraceable_module_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(_Branching()))
    raises("in 1.0 (_Branching)", trace, model)


# ----- rules, each on the smallest model that needs it


class _GroupedQueryAttention(nn.Module):
    def __init__(self, width=32, heads=4, kv_heads=2, head_dim=8):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(width, heads * head_dim)
        self.kv = nn.Linear(width, 2 * kv_heads * head_dim)
        self.out = nn.Linear(heads * head_dim, width)

    def forward(self, x):
        batch, tokens, _ = x.shape
        q = self.q(x).view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, tokens, 2 * self.kv_heads, self.head_dim).transpose(1, 2).chunk(2, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, -1)).mean(1)


def test_sdpa_grouped_query_attention_permutes_kv_heads_with_their_queries():
    """``enable_gqa``: query head h reads kv head h // 2, so q's heads are (kv heads × 2), not one space."""
    torch.manual_seed(0)
    model = _GroupedQueryAttention().eval()
    result = permutation_invariance(model, torch.randn(2, 5, 32))
    assert result["relative_diff"] < 1e-10 and result["unsupported"] == []
    analysis = _analysis(model, torch.randn(2, 5, 32))
    kv, per_kv, _ = _factors(analysis, "q.weight")
    assert analysis.table.size(kv) == 2 and analysis.table.size(per_kv) == 2
    assert not analysis.table.is_fixed(kv) and not analysis.table.is_fixed(per_kv)


class _TiedLanguageModel(nn.Module):
    """Input and output embeddings are one parameter, with a layer between them."""

    def __init__(self, vocab=16, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_embeddings_are_one_space():
    """Two uses of one parameter: the embedding's width and the head's input are the same space."""
    torch.manual_seed(0)
    model = _TiedLanguageModel().eval()
    ids = torch.randint(0, 16, (2, 5))
    result = permutation_invariance(model, ids)
    assert result["relative_diff"] < 1e-10 and result["free_groups"] == 1  # the width; mix's output is tied to it
    analysis = _analysis(model, ids)
    vocab, width = analysis.params["embed.weight"].dims
    assert analysis.table.is_fixed(vocab) and not analysis.table.is_fixed(width)


def test_embeddings_fix_the_vocabulary_and_permute_the_width():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 4)).eval()
    ids = torch.randint(0, 16, (2, 5))
    assert permutation_invariance(model, ids)["relative_diff"] < 1e-10
    analysis = _analysis(model, ids)
    vocab, width = analysis.params["0.weight"].dims
    assert analysis.table.is_fixed(vocab) and not analysis.table.is_fixed(width)
    assert analysis.table.find(width.id) == analysis.table.find(analysis.params["1.weight"].dims[1].id)


class _ComputedView(nn.Module):
    """GPT-2's reshape to a shape built in the graph from a size read at run time."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x)).flatten(0, 1)
        return self.head(h.view((-1,) + x.shape[1:2] + (h.size(-1),)))


def test_a_shape_computed_in_the_graph_gets_the_merged_width():
    torch.manual_seed(0)
    models, x = [_ComputedView().eval(), _ComputedView().eval()], torch.randn(64, 5, 4)
    result = pleascc.merge(*models, x, budget=2.0, labels="separate", progress=False)
    with torch.no_grad():
        for got, model in zip(result.model(x), models):
            assert relative_error(got.numpy(), model(x)) < 1e-4


# ----- exact merges through ONNX Runtime


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_hf_merges_that_must_be_exact(name, tmp_path):
    """Self-merge and permuted-copy merge at 1.0 are the model; 2.0 with separate labels is A and B side by side."""
    model, inputs = _model(name)
    torch.manual_seed(0)
    x, x_test = inputs(64), inputs(8)
    with torch.no_grad():
        want = _first(model(x_test))
    for other in (model, permuted_copy(model, x)):
        result = pleascc.merge(model, other, x, budget=1.0, progress=False)
        assert result.report["relative_flops"] == pytest.approx(1.0)
        (got,) = predict_through_onnx(result.model, x_test, tmp_path)
        assert relative_error(got, want) < 1e-4
    model_b, _ = _model(name, seed=1)
    result = pleascc.merge(model, model_b, x, budget=2.0, labels="separate", progress=False)
    assert result.report["relative_flops"] == pytest.approx(2.0)
    got_a, got_b = predict_through_onnx(result.model, x_test, tmp_path)
    with torch.no_grad():
        want_b = _first(model_b(x_test))
    assert relative_error(got_a, want) < 1e-4
    assert relative_error(got_b, want_b) < 1e-4
