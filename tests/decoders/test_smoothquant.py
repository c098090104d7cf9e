"""SmoothQuant: s = max|X|^alpha / max|W|^(1 - alpha) per channel (computed here from the calibration activations),
folded into the norms without changing the float model; the W8A8 model is closer to the float one after smoothing
than without it when activations have outlier channels."""
import copy

import torch

from decoders.quantize import W8A8Linear, linear_names, quantize_model, quantized_linear, replace_module
from decoders.smoothquant import smooth, smoothquant_quantize

from tests.decoders.test_awq import CALIB, logits_error, outlier_llama


def test_smoothing_scale_formula_and_fold_keep_the_float_model():
    model = outlier_llama()
    ref = copy.deepcopy(model)
    x_max = []
    hook = model.layers[0].self_attn.qkv_proj.register_forward_pre_hook(
        lambda m, inp: x_max.append(inp[0].reshape(-1, 64).abs().amax(0)))
    with torch.no_grad():
        for row in CALIB:
            model(row[None])
    hook.remove()
    x_max = torch.stack(x_max).amax(0)
    w_max = model.layers[0].self_attn.qkv_proj.weight.abs().amax(0)
    alpha = 0.7
    expected_s = x_max ** alpha / w_max ** (1 - alpha)
    smooth(model, CALIB, alpha)
    s = ref.layers[0].input_layernorm.weight / model.layers[0].input_layernorm.weight
    assert torch.allclose(s, expected_s, rtol=1e-4)
    assert torch.allclose(model.layers[0].self_attn.qkv_proj.weight, ref.layers[0].self_attn.qkv_proj.weight * s, rtol=1e-5)
    assert logits_error(model, ref, CALIB) < 1e-5


def test_smoothquant_w8a8_beats_plain_w8a8_on_outliers():
    model = outlier_llama()
    with torch.no_grad():
        for layer in model.layers:  # sharper outliers: the case SmoothQuant is for
            layer.input_layernorm.weight[:2] *= 10
    sq = smoothquant_quantize(copy.deepcopy(model), CALIB, alpha=0.5)
    assert all(isinstance(sq.get_submodule(n), W8A8Linear) for n in linear_names(model))
    plain = copy.deepcopy(model)
    for n in linear_names(plain):  # W8A8 without smoothing
        replace_module(plain, n, quantized_linear(plain.get_submodule(n), 8, None, activations=True))
    held_out = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(7))
    assert logits_error(sq, model, held_out) < logits_error(plain, model, held_out)
    assert logits_error(sq, model, held_out) < 0.1
    assert isinstance(quantize_model(copy.deepcopy(model), "smoothquant", 8, None, calib=CALIB).lm_head, W8A8Linear)
