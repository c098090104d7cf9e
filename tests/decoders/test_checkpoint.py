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
