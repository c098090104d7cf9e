"""AWQ: the scale fold leaves the float model unchanged; on activations with outlier channels AWQ's quantized model
is closer to the float one than RTN's at 4 and 3 bits; the pairs of preceding op and linears found in the Llama
block (fused q/k/v and gate/up)."""
import copy

import pytest
import torch

from decoders import LlamaConfig, LlamaForCausalLM
from decoders.awq import ScaleGroup, awq_quantize, collect_inputs, fold_scale, scale_groups, search_scale
from decoders.quantize import Int4Linear, linear_names, quantize_model


def outlier_llama(kv_heads=4, seed=0):
    """A tiny Llama whose hidden states have a few large channels (as real LLMs' activations do)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        model.embed_tokens.weight[:, :4] *= 20  # outlier channels
        for layer in model.layers:
            layer.input_layernorm.weight[:4] *= 8
            layer.post_attention_layernorm.weight[:4] *= 8
    return model


CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def logits_error(model, ref_model, ids):
    with torch.no_grad():
        ref = ref_model(ids)
        return ((model(ids) - ref).norm() / ref.norm()).item()


def test_llama_pairs_and_fold_keeps_the_float_model():
    model = outlier_llama()
    names = linear_names(model)
    stats, fed_by = collect_inputs(model, CALIB, names)
    groups = {tuple(g.linears): g for g in scale_groups(model, names, fed_by)}
    assert groups[("layers.0.self_attn.qkv_proj",)].prev == "layers.0.input_layernorm"
    assert groups[("layers.1.mlp.gate_up_proj",)].prev == "layers.1.post_attention_layernorm"
    assert groups[("layers.0.mlp.down_proj",)] == ScaleGroup("layers.0.mlp.gate_up_proj", ["layers.0.mlp.down_proj"],
                                                              slice(128, 256))  # the up half
    assert groups[("layers.1.self_attn.o_proj",)].rows == slice(128, 192)  # v, the last third of q/k/v
    assert stats["layers.0.mlp.down_proj"]["rows"].shape == (128, 128)
    ref = copy.deepcopy(model)
    for g in groups.values():
        if g.prev is not None:
            s = torch.rand(g.rows.stop - g.rows.start if g.rows else model.config.hidden_size) * 3 + 0.2
            fold_scale(model, g, s)
    assert logits_error(model, ref, CALIB) < 1e-5
    assert (model.layers[0].input_layernorm.weight - ref.layers[0].input_layernorm.weight).abs().max() > 0.1


def test_grouped_query_attention_gets_no_v_fold():
    model = outlier_llama(kv_heads=2)
    names = linear_names(model)
    groups = scale_groups(model, names, collect_inputs(model, CALIB, names)[1])
    o = [g for g in groups if g.linears == ["layers.0.self_attn.o_proj"]][0]
    assert o.prev is None  # v [2 heads] is narrower than o_proj's input [4 heads]


def test_scale_search_includes_rtn_and_beats_it_on_outliers():
    torch.manual_seed(0)
    X = torch.randn(256, 128) * torch.cat([torch.full((8,), 30.0), torch.ones(120)])
    W = torch.randn(64, 128) * 0.1
    s, err, rtn_err = search_scale(X, X.abs().mean(0), W, 4, 32, False)
    assert err < 0.9 * rtn_err
    assert s[:8].mean() > s[8:].mean()  # salient (large-activation) channels are scaled up


@pytest.mark.parametrize("bits,g", [(4, 32), (3, 32), (4, 64)])
def test_awq_beats_rtn(bits, g):
    model = outlier_llama()
    awq = awq_quantize(copy.deepcopy(model), CALIB, bits, g)
    rtn = quantize_model(copy.deepcopy(model), "rtn", bits, g)
    assert all(isinstance(awq.get_submodule(n), Int4Linear) for n in linear_names(model))
    held_out = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(7))
    for ids in (CALIB, held_out):
        assert logits_error(awq, model, ids) < logits_error(rtn, model, ids)


def test_awq_options_checked():
    with pytest.raises(ValueError, match="low-bit"):
        awq_quantize(outlier_llama(), CALIB, 8, None)
    with pytest.raises(ValueError, match="group_size in"):
        quantize_model(outlier_llama(), "awq", 4, 48, calib=CALIB)
