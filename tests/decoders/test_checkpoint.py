"""Hostile checkpoint files: shard paths leaving the directory, NaN weights, JSON that is not an object."""
import json

import pytest
import torch
from safetensors.torch import save_file

from decoders import CheckpointError, LlamaForCausalLM
from decoders.checkpoint import read_hf_weights, read_json
from tests.decoders.hf_llama import make_hf_llama


def test_shard_index_may_not_point_outside_the_model_directory(tmp_path):
    outside = tmp_path / "secret.safetensors"
    save_file({"x": torch.zeros(2)}, str(outside))
    model = tmp_path / "model"
    model.mkdir()
    for shard in ("../secret.safetensors", str(outside)):
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
        with pytest.raises(CheckpointError, match="lies outside the model directory"):
            read_hf_weights(model)


def test_nan_or_infinite_weights_are_refused_naming_the_tensor(tmp_path):
    ref = make_hf_llama(tmp_path, num_key_value_heads=2)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    sd["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    sd["model.norm.weight"][0] = float("inf")
    (tmp_path / "model.safetensors").unlink()
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"NaN or infinity: layers.1.mlp.down_proj.weight, norm.weight"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_json_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match=r"config.json: holds a JSON list, not an object"):
        read_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json: holds a JSON list"):
        LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", "256", "config hidden_size must be a positive integer, got '256' (str)"),
    ("max_position_embeddings", 1e9, "config max_position_embeddings must be a positive integer, got 1000000000.0"),
    ("num_hidden_layers", 0, "config num_hidden_layers must be a positive integer, got 0 (int)"),
    ("rms_norm_eps", "1e-5", "config rms_norm_eps must be a positive number, got '1e-5' (str)"),
])
def test_config_values_of_the_wrong_type_are_named(tmp_path, key, value, message):
    make_hf_llama(tmp_path, num_key_value_heads=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        LlamaForCausalLM.from_pretrained(tmp_path)
    assert f"config.json: {message}" in str(e.value)
