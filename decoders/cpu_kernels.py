"""The project's C++ kernels for CPU decode steps, built from source on first use (AVX512-VNNI):

    w4a8.cpp              torch.ops.mm_w4a8.linear, .dequantize_t   W4A8 products (decoders.w4a8)
                          torch.ops.mm_w4a8.w4_linear,              weight-only 4-bit products on the same bytes
                          .w4_dequantize_t                          (Int4Linear)
    decode_attention.cpp  torch.ops.mm_attention.decode            one token's attention over a static cache
    linear.cpp            torch.ops.mm_linear.rows                 float32 and bf16 products of 1-4 rows
                                                                   (decoders.linear; bf16 needs AVX512-BF16, `bf16`)
                          torch.ops.mm_linear.int8_rows            int8 x int8 -> int32 of 1-4 rows (W8A8)
                          torch.ops.mm_linear.w8_linear            weight-only int8 products of 1-4 rows
                                                                   (Int8Linear: x as 15-bit integers, exact)
    decode_block.cpp      torch.ops.mm_decode.block                a Llama block for one token, eagerly
                                                                   (decoders.decode_block; the two above inside)

One library, built by torch's C++ extension builder (`TORCH_EXTENSIONS_DIR`, ~30 s once, then cached and loaded in
well under a second); each op a compiled step may call has a fake implementation. Without the instructions
or a compiler, `build()` says so once and callers run their PyTorch forms.
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
SOURCES = ("w4a8.cpp", "decode_attention.cpp", "linear.cpp", "decode_block.cpp")
loaded = False  # set by `build()`; read by callers (a plain flag that compiled steps can read)
bf16 = False  # loaded, and the CPU has AVX512-BF16 (bf16 rows in `linear.cpp`)
log = logging.getLogger(__name__)


@functools.cache
def cpu_info(field: str) -> str:
    """The first value /proc/cpuinfo gives `field` ("flags", "vendor_id", ...; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":")[0].strip() == field),
                "")


def cpu_flags() -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none)."""
    return set(cpu_info("flags").split())


@functools.cache
def build() -> bool:
    """Whether the kernels are loaded: the CPU has AVX512-VNNI and the C++ compiler built them."""
    global loaded, bf16
    flags = cpu_flags()
    if not CPU_FLAGS <= flags:
        return False
    ext_log = logging.getLogger("torch.utils.cpp_extension")
    level = ext_log.level
    ext_log.setLevel(logging.ERROR)  # its import warns that CUDA_HOME has no CUDA runtime: these kernels are CPU-only
    try:
        from torch.utils.cpp_extension import _get_build_directory, load
    finally:
        ext_log.setLevel(level)

    if not (Path(_get_build_directory("mm_cpu_kernels", False)) / "mm_cpu_kernels.so").exists():
        log.warning("building the C++ CPU kernels (W4A8, float32 and bf16 products, decode attention and blocks): "
                    "once on this machine, ~30 s")
    t0 = time.perf_counter()
    try:
        load(name="mm_cpu_kernels", sources=[str(Path(__file__).with_name(s)) for s in SOURCES],
             is_python_module=False,
             extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512dq", "-mfma",
                           "-fopenmp", "-DCPU_CAPABILITY_AVX512",  # ATen's vector types in their AVX-512 form
                           "-ffp-contract=off"],  # a * b + c rounds twice, as torch's ops
             extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError) as e:  # no compiler, no ninja, a failed build
        log.warning("the C++ CPU kernels were not built (%s); W4A8, float32 and bf16 products, decode attention and "
                    "blocks run in PyTorch", e)
        return False
    torch.library.register_fake("mm_w4a8::linear")(
        lambda x, packed, sc, group: x.new_empty(x.shape[0], packed.shape[0] * 16))
    torch.library.register_fake("mm_w4a8::dequantize_t")(
        lambda packed, sc, group, dtype: packed.new_empty(packed.shape[1] * 8, packed.shape[0] * 16,
                                                                    dtype=dtype))
    torch.library.register_fake("mm_w4a8::w4_linear")(
        lambda x, packed, sz, group: x.new_empty(x.shape[0], packed.shape[0] * 16))
    torch.library.register_fake("mm_w4a8::w4_dequantize_t")(
        lambda packed, sz, group: packed.new_empty(packed.shape[1] * 8, packed.shape[0] * 16, dtype=torch.float32))
    torch.library.register_fake("mm_attention::decode")(lambda q, k, v, mask: torch.empty_like(q))
    torch.library.register_fake("mm_linear::rows")(lambda x, w, bias: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("mm_linear::int8_rows")(
        lambda x, w: x.new_empty(x.shape[0], w.shape[0], dtype=torch.int32))
    torch.library.register_fake("mm_linear::w8_linear")(lambda x, w, s: x.new_empty(x.shape[0], w.shape[0]))
    if time.perf_counter() - t0 > 2:
        log.warning("built the C++ CPU kernels in %.0f s (once; cached)", time.perf_counter() - t0)
    loaded = True
    bf16 = "avx512_bf16" in flags
    return True
