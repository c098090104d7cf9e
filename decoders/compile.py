"""The kernel policy of decoding: `torch.compile` of the model's decode step, inductor's settings for it on CPU, and
ATen's one-row products instead of oneDNN's around a bf16 CPU step. The model itself is plain modules."""
from __future__ import annotations

import contextlib
import logging
import time
import types

import torch

from .qlinear import W8A8Linear

# Inductor settings for the compiled CPU decode step: weights frozen into the graph, GEMMs picked by measurement
# between inductor's C++ template and ATen, bf16/fp16 rounded where eager rounds (so greedy tokens stay those of the
# eager model), and a C++ wrapper calling the kernels (a Python one costs ~1 ms a token). The CPU's base vector
# ISA is taken from its flags (inductor otherwise compiles and runs a probe program for it in every process). No FX
# graph cache: its key leaves out the values of frozen weights, so a second model of the same shapes (in this process
# or a later one) could load the first one's step and run its weights (torch 2.11; seen once a process had compiled
# any other step).
CPU_DECODE_INDUCTOR = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       "emulate_precision_casts": True, "cpp_wrapper": True, "cpp.vec_isa_ok": True,
                       "fx_graph_cache": False}


log = logging.getLogger(__name__)


def own_code(method):
    """`method` bound to a copy of its function with a code object of its own (dynamo's cache lives on code objects)."""
    f = method.__func__
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = f.__kwdefaults__, f.__qualname__
    return types.MethodType(copy, method.__self__)


def compile_decode(model):
    """Compile `model.decode_step` once with `torch.compile` (whole graph, static shapes) and keep it for `generate`.

    For inference: the weights are frozen into the compiled step. On CPU, weights are prepacked where that measured
    faster (`prepack_weights`); float32 one-row products run on inductor's C++ GEMM template, others on the template
    or ATen, whichever autotuning timed faster; on CUDA, `generate` replays it as a CUDA graph (one launch a token).
    Each CPU compile (a new model, batch, dtype or cache size) says so, and then how long it took, as warnings of the
    `decoders.compile` logger (stderr unless logging is configured otherwise).
    """
    if model.compiled_decode_step is None:
        if model.device.type == "cuda":  # generate captures it in a CUDA graph (decoders/cuda_graph.py)
            model.compiled_decode_step = torch.compile(model.decode_step, fullgraph=True, dynamic=False)
        else:
            # The weights are frozen into the step, so dynamo's guards on the module are pure cost (~0.1 ms a token).
            # Without them dynamo cannot tell two models apart, and it keeps compiled graphs per code object: each
            # model compiles its own copy of decode_step, or a second model would run the first one's weights.
            compiled = torch.compile(own_code(model.decode_step), fullgraph=True, dynamic=False,
                                     options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

            compiled_for = set()  # the call signatures compiled so far

            def step(token, position, slot, key_mask, cache, cache_lens=None):
                # inductor reads these when a call compiles; as torch.compile options, freezing is not applied.
                # Once a signature has compiled they are not set again (entering the patch costs ~45 us a step).
                key = (tuple(key_mask.shape), cache_lens is None, torch.is_inference_mode_enabled(),
                       torch.is_grad_enabled())
                if key in compiled_for:
                    return compiled(token, position, slot, key_mask, cache, cache_lens)
                log.warning("compiling the decode step for batch %d, %s, %d cache slots: 20-130 s on a CPU, once per "
                            "model and shape in a process", token.shape[0], str(model.dtype).removeprefix("torch."),
                            key_mask.shape[1])
                t0 = time.perf_counter()
                settings = {**CPU_DECODE_INDUCTOR, "cpp.weight_prepack": prepack_weights(model, token.shape[0])}
                if model.dtype == torch.float32 and token.shape[0] == 1:
                    # Autotuning times each product alone, its weights hot in cache, and then prefers MKL; inside
                    # the step the weights stream from memory, where inductor's C++ template is faster (measured at
                    # batch 1: 125M 50 -> 110-140 tokens/s, 10M 1130 -> 1650-1740).
                    settings["max_autotune_gemm_backends"] = "CPP"
                try:
                    with torch._inductor.config.patch(settings):
                        out = compiled(token, position, slot, key_mask, cache, cache_lens)
                except torch._inductor.exc.InductorError:  # a product no C++ template takes: let ATen's in
                    if settings["max_autotune_gemm_backends"] != "CPP":
                        raise
                    with torch._inductor.config.patch({**settings, "max_autotune_gemm_backends": "CPP,ATEN"}):
                        out = compiled(token, position, slot, key_mask, cache, cache_lens)
                compiled_for.add(key)
                log.warning("compiled the decode step in %.0f s", time.perf_counter() - t0)
                return out

            model.compiled_decode_step = step
    return model.compiled_decode_step


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache size (Linux sysfs; 32 MiB when it does not say)."""
    for index in (3, 2):
        try:
            size = open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size").read().strip()
        except OSError:
            continue
        return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else int(size)
    return 32 * 2**20


def prepack_weights(model, batch: int) -> bool:
    """Whether the compiled CPU step lets oneDNN/MKL prepack (re-lay out once) its weights. Measured on the 2-core
    EPYC, decode tokens/s at batch 1, plain vs prepacked: 10M float32 430 -> 980, 125M float32 38 -> 53, 10M bfloat16
    1250 -> 2380 (its 12 MB of weights stay in the last-level cache), but 125M bfloat16 160 -> 86 (ATen's own bf16
    GEMV streams weights from memory faster). Several rows: oneDNN's blocked kernels win. Not with W8A8
    linears at batch 1: prepacking turns their int8 products into oneDNN's quantized linear, slower for one row
    (10M W8A8: 570 tokens/s against 3000 with `torch._int_mm` on plain weights)."""
    if batch == 1 and any(isinstance(m, W8A8Linear) for m in model.modules()):
        return False
    if batch > 1 or model.dtype == torch.float32:
        return True
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights <= last_level_cache_bytes()


def aten_gemv(model, batch: int) -> bool:
    """Whether a decode step of `batch` rows runs with oneDNN switched off (`gemv_flags`). oneDNN's bf16/fp16 matmul
    is slow for the one-row products of a CPU decode step (it re-lays out the weight); ATen's own kernel streams the
    weights faster (~37 GB/s in the 125M step here). With several rows oneDNN's blocked kernels win; and W8A8's int8
    product (`torch._int_mm`) is oneDNN's, without which ATen runs a reference loop ~250x slower (3072 x 768:
    56 us -> 14 ms), so a model holding any stays on oneDNN."""
    return (model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16) and batch == 1
            and not any(isinstance(m, W8A8Linear) for m in model.modules()))


@contextlib.contextmanager
def gemv_flags(off: bool):
    """oneDNN switched off inside the block when `off` (decided once per model and batch by `aten_gemv`)."""
    if not off:
        yield
        return
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
