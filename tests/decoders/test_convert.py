"""The Llama checkpoint converters on their own: Hugging Face keys <-> ours, Meta -> Hugging Face, shard merging."""
import pytest
import torch

from decoders import LlamaConfig
from decoders.convert_hf import convert_hf_state_dict, to_hf_state_dict
from decoders.convert_meta import hf_config_from_meta_params, merge_meta_shards, meta_to_hf_state_dict
from tests.decoders.hf_llama import make_hf_llama
from tests.decoders.test_llama import hf_to_meta


@pytest.mark.parametrize("overrides", [dict(num_key_value_heads=2), dict(num_key_value_heads=4, tie_word_embeddings=True)])
def test_hf_round_trip_is_exact(tmp_path, overrides):
    ref = make_hf_llama(tmp_path, **overrides)
    cfg = LlamaConfig.from_hf(ref.config.to_dict())
    hf = {k: v for k, v in ref.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    ours = convert_hf_state_dict(hf, cfg)
    assert "layers.1.self_attn.qkv_proj.weight" in ours and "layers.0.mlp.gate_proj.weight" not in ours
    back = to_hf_state_dict(ours, cfg)
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_meta_to_hf_undoes_the_rope_permutation_and_reads_params(tmp_path):
    ref = make_hf_llama(tmp_path, num_key_value_heads=2)
    meta = hf_to_meta(ref.state_dict(), ref.config)  # written independently in the tests
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1, norm_eps=1e-6, rope_theta=10000.0)
    hf_cfg = hf_config_from_meta_params(params, meta)
    want = ref.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert hf_cfg[key] == getattr(want, key), key
    hf = meta_to_hf_state_dict(meta, LlamaConfig.from_hf(hf_cfg))
    sd = ref.state_dict()
    assert hf.keys() == sd.keys() and all(torch.equal(hf[k], sd[k]) for k in sd)


def test_meta_shards_merge_along_their_parallel_dimension(tmp_path):
    ref = make_hf_llama(tmp_path, num_key_value_heads=2)
    meta = hf_to_meta(ref.state_dict(), ref.config)
    split = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards = [{k: (v if split.get(k.split(".")[-2]) is None else v.chunk(2, split[k.split(".")[-2]])[s]).clone()
               for k, v in meta.items()} for s in range(2)]
    merged = merge_meta_shards(shards)
    assert merged.keys() == meta.keys() and all(torch.equal(merged[k], meta[k]) for k in meta)
    del shards[1]["layers.0.attention.wq.weight"]
    with pytest.raises(Exception, match="layers.0.attention.wq.weight is missing from some consolidated shards"):
        merge_meta_shards(shards)
