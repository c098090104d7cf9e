"""CUDA checks for a lent GPU machine (not collected by pytest: CI has no GPU). Writes JSON; exits 1 on a failure.

Run by tests/gpu/run.sh: Llama parity and generation on CUDA against transformers (eager, the compiled CUDA-graph
decode step, and long caches where attention runs the FlashDecoding Triton kernel, compiled or not), the kernel
against SDPA (correctness, and time from 4k to 128k keys), ViT against timm, decode speed of a 1.1B model against
the read bound. Correctness checks append their failures to one list; the script prints them and exits non-zero
when there are any. Speeds are recorded, not asserted.
"""
import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LOGIT_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.1}  # max |logit difference| against transformers


def count_flash_decode_calls():
    """Count the Python-level calls of the `mm::flash_decode` operator (eager calls and CUDA-graph warm-up/recording;
    a replayed graph runs the captured kernels without Python)."""
    import decoders.flash_decoding as fd

    calls = {"n": 0}
    inner = fd.flash_decode_triton

    def counting(*args, **kwargs):
        calls["n"] += 1
        return inner(*args, **kwargs)

    fd.flash_decode_triton = counting
    return calls


def check_llama(results, failures):
    import transformers

    from decoders import LlamaForCausalLM

    calls = count_flash_decode_calls()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    from mm.eval.bench import give_clear_choices
    give_clear_choices(ref.model.embed_tokens.weight, ref.lm_head.weight)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        for dtype in (torch.float32, torch.bfloat16):
            ours = LlamaForCausalLM.from_pretrained(d, dtype=dtype, device="cuda")
            r = ref.to("cuda", dtype)
            ids = torch.randint(3, 32000, (2, 64), device="cuda")
            mask = torch.ones_like(ids)
            mask[1, :10] = 0
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                a = r(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
                b = ours(ids, attention_mask=mask).float()
            err = (a - b)[mask.bool()].abs().max().item()
            row = {"max_abs_err_logits": err}
            g_ref = r.generate(ids[:1], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
            long_ids = torch.randint(3, 32000, (1, 1500), device="cuda")  # cache >= 1024: FlashDecoding path
            g_long_ref = r.generate(long_ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
            # eager first (generate uses the compiled step once there is one)
            row["greedy_equal"] = torch.equal(g_ref, ours.generate(ids[:1], max_new_tokens=32, eos_token_id=None))
            n0 = calls["n"]
            row["long_flashdecoding_equal"] = torch.equal(g_long_ref, ours.generate(long_ids, max_new_tokens=16,
                                                                                    eos_token_id=None))
            row["long_eager_kernel_calls"] = calls["n"] - n0  # 15 steps x 12 layers
            row["compiled_equal"] = torch.equal(g_ref, ours.generate(ids[:1], max_new_tokens=32, eos_token_id=None,
                                                                     compile=True))
            n0 = calls["n"]
            row["long_compiled_equal"] = torch.equal(g_long_ref, ours.generate(long_ids, max_new_tokens=16,
                                                                               eos_token_id=None, compile=True))
            # > 0: the compiled step called the kernel while it was warmed up and captured (replays run no Python)
            row["long_compiled_kernel_calls"] = calls["n"] - n0
            row["compiled_again_equal"] = torch.equal(g_long_ref, ours.generate(long_ids, max_new_tokens=16,
                                                                                eos_token_id=None))  # graph reused
            results[f"llama_{dtype}"] = row
            if err > LOGIT_TOL[dtype]:
                failures.append(f"llama {dtype}: logit error {err:.3g} > {LOGIT_TOL[dtype]}")
            for k in ("greedy_equal", "compiled_equal", "long_flashdecoding_equal", "long_compiled_equal",
                      "compiled_again_equal"):
                if not row[k]:
                    failures.append(f"llama {dtype}: {k} is False")
            if row["long_eager_kernel_calls"] == 0 or row["long_compiled_kernel_calls"] == 0:
                failures.append(f"llama {dtype}: the FlashDecoding kernel did not run on the long cache ({row})")
            del ours
            torch.compiler.reset()


def check_flash_decoding(results, failures):
    from decoders.flash_decoding import decode_attention, flash_decode_triton

    torch.manual_seed(0)
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        for H, Hkv, D in ((32, 8, 128), (32, 32, 64), (16, 1, 128)):
            B, S = 4, 8192
            q = torch.randn(B, H, D, device="cuda", dtype=dtype)
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
            v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype)
            lens = torch.tensor([S, 1, 4097, 777], device="cuda")
            for splits in (1, 8, 32):
                out = flash_decode_triton(q, k, v, lens, splits).float()
                err = 0.0
                for b in range(B):
                    L = int(lens[b])
                    ref = F.scaled_dot_product_attention(q[b:b + 1, :, None].float(),
                                                         k[b:b + 1, :, :L].float().repeat_interleave(H // Hkv, 1),
                                                         v[b:b + 1, :, :L].float().repeat_interleave(H // Hkv, 1))
                    err = max(err, (out[b] - ref[0, :, 0]).abs().max().item())
                rows.append({"dtype": str(dtype), "H": H, "Hkv": Hkv, "D": D, "splits": splits, "max_abs_err": err})
                if not err <= tol:
                    failures.append(f"flash decoding {rows[-1]}: error above {tol}")
    results["flash_decoding_correctness"] = rows
    # Batch 1, Llama-3-8B heads (32 query, 8 kv, 128 wide), bf16: the kernel as the model calls it (split count of
    # choose_num_splits) against SDPA over the same keys, each replayed in a CUDA graph as in the decode step (so
    # Python's launch cost is not timed); and the kernel at fixed split counts, to check the heuristic.
    from triton.testing import do_bench_cudagraph

    from decoders.flash_decoding import choose_num_splits

    timing = []
    for S in (4096, 16384, 32768, 65536, 131072):
        q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.tensor([S], device="cuda")
        sdpa_us = 1e3 * do_bench_cudagraph(lambda: F.scaled_dot_product_attention(q.view(1, 8, 4, 128), k, v))
        flash_us = 1e3 * do_bench_cudagraph(lambda: decode_attention(q, k, v, lens))
        gb = 2 * k.numel() * k.element_size() / 1e9
        row = {"S": S, "sdpa_us": sdpa_us, "flash_decoding_us": flash_us, "speedup": sdpa_us / flash_us,
               "flash_decoding_TB_s": gb / (flash_us * 1e-6) / 1e3, "splits": choose_num_splits(8, S, 132),
               "at_least_sdpa": flash_us <= sdpa_us}
        for n in (1, 4, 8, 16, 32, 64):
            row[f"us_splits_{n}"] = 1e3 * do_bench_cudagraph(lambda: flash_decode_triton(q, k, v, lens, n))
        timing.append(row)
    results["flash_decoding_timing"] = timing


def check_decode_speed(results, failures):
    """1.1B (TinyLlama shape) bf16, batch 1: tokens/s of generate(compile=True) and of the bare graph replay,
    against the read bound (bytes a step reads over the measured read bandwidth)."""
    from decoders import LlamaConfig, LlamaForCausalLM
    from decoders.llama import rope_inv_freq
    from mm.eval.bench import LLAMA_SIZES, decode_bytes_per_token, read_bandwidth

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_SIZES["1b"], max_position_embeddings=2048)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.inv_freq = rope_inv_freq(cfg).to("cuda")
    ids = torch.randint(3, cfg.vocab_size, (1, 16), device="cuda")
    new = 256

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, eos_token_id=None, compile=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    t0 = time.perf_counter()
    gen(new)  # compile + capture
    row = {"compile_and_capture_s": time.perf_counter() - t0}
    t_one = min(gen(1) for _ in range(3))
    t_all = min(gen(new) for _ in range(3))
    row["generate_tok_s"] = (new - 1) / (t_all - t_one)
    graph = model.static_decoder.graph
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    row["replay_tok_s"] = 200 / (time.perf_counter() - t)
    bw = read_bandwidth(device="cuda")
    row["read_TB_s"] = bw / 1e12
    row["read_bound_tok_s"] = bw / decode_bytes_per_token(model, 1, 16 + new // 2)
    row["generate_fraction_of_bound"] = row["generate_tok_s"] / row["read_bound_tok_s"]
    row["replay_fraction_of_bound"] = row["replay_tok_s"] / row["read_bound_tok_s"]
    results["decode_speed_1b_bf16"] = row


def check_flash_mla(results, failures):
    """FlashMLA-style decode (decoders/flash_mla.py) at DeepSeek-V3's widths (latent 512 + RoPE 64, 64-row pages),
    bf16: the Triton kernel (through the mm::flash_mla_decode operator, fixed split counts, torch.compile) against the
    PyTorch reference on a shuffled paged cache; then its time in CUDA graphs from 4k to 64k context, as bytes of
    latent cache read per second, beside plain matmuls over the same latent stored contiguously."""
    from triton.testing import do_bench_cudagraph

    from decoders.flash_decoding import choose_num_splits
    from decoders.flash_mla import PagedLatentCache, flash_mla_decode, flash_mla_reference, flash_mla_triton

    r, d, page, dtype = 512, 64, 64, torch.bfloat16
    scale = 192 ** -0.5  # V3: 1 / sqrt(nope 128 + rope 64)

    def filled(lens, H, max_len):
        torch.manual_seed(0)
        blocks = sum(-(-n // page) for n in lens) + 4
        cache = PagedLatentCache(1, blocks, page, r, d, len(lens), max_len, dtype=dtype, device="cuda")
        cache.free_blocks = torch.randperm(blocks).tolist()  # pages in no particular order
        slots = cache.append(lens)
        cache.write(0, slots, torch.randn(len(slots), r, device="cuda"), torch.randn(len(slots), d, device="cuda"))
        return cache, torch.randn(len(lens), H, r + d, device="cuda", dtype=dtype)

    rows = []
    for H in (16, 128):
        cache, q = filled([1, 4097, 777, 8192, 64], H, 8192)
        args = (q, cache.blocks[0], cache.block_table, cache.cache_seqlens, r, scale)
        ref_out, ref_lse = flash_mla_reference(*args)
        runs = {f"splits_{n}": flash_mla_decode(*args, num_splits=n) for n in (1, 8, 32)}
        runs["operator"] = flash_mla_decode(*args)
        runs["compiled"] = torch.compile(flash_mla_decode, fullgraph=True)(*args)
        try:  # wider tiles: may not fit a GPU's registers or shared memory (recorded, not a failure)
            runs["block_h_32"] = flash_mla_triton(*args, 4, block_h=32, block_n=16)
        except Exception as e:
            rows.append({"H": H, "run": "block_h_32", "error": f"{type(e).__name__}: {str(e)[:200]}"})
        for name, (out, lse) in runs.items():
            row = {"H": H, "run": name, "max_abs_err": (out.float() - ref_out.float()).abs().max().item(),
                   "max_abs_err_lse": (lse - ref_lse).abs().max().item()}
            rows.append(row)
            if not (torch.allclose(out.float(), ref_out.float(), atol=1e-2, rtol=1e-2)
                    and torch.allclose(lse, ref_lse, atol=1e-3, rtol=0)):
                failures.append(f"flash MLA {row}: error above 1e-2 (+1e-2 relative) or 1e-3 (LSE)")
        torch.compiler.reset()
    results["flash_mla_correctness"] = rows

    props = torch.cuda.get_device_properties(0)
    timing = []
    for B in (1, 32):
        for S in (4096, 16384, 65536):
            cache, q = filled([S] * B, 128, S)
            args = (q, cache.blocks[0], cache.block_table, cache.cache_seqlens, r, scale)
            latent = torch.randn(B, S, r + d, device="cuda", dtype=dtype)  # the same bytes, unpaged
            gb = B * S * (r + d) * 2 / 1e9
            kernel_us = 1e3 * do_bench_cudagraph(lambda: flash_mla_decode(*args))
            matmul_us = 1e3 * do_bench_cudagraph(
                lambda: torch.softmax((q @ latent.transpose(1, 2)).float() * scale, -1).to(dtype) @ latent[..., :r])
            row = {"B": B, "H": 128, "S": S, "latent_GB": gb, "fits_L2": gb * 1e9 < getattr(props, "L2_cache_size", 0),
                   "splits": choose_num_splits(B * 8, S, props.multi_processor_count), "flash_mla_us": kernel_us,
                   "flash_mla_TB_s": gb / (kernel_us * 1e-6) / 1e3, "dense_matmul_us": matmul_us,
                   "speedup_vs_matmul": matmul_us / kernel_us}
            for block_h, block_n in ((16, 32), (32, 32), (64, 16), (16, 64)):
                try:
                    row[f"us_h{block_h}_n{block_n}"] = 1e3 * do_bench_cudagraph(
                        lambda: flash_mla_triton(*args, 8, block_h=block_h, block_n=block_n))
                except Exception as e:  # a tile that does not fit (shared memory, registers) is a finding, not a fail
                    row[f"us_h{block_h}_n{block_n}"] = f"{type(e).__name__}: {str(e)[:120]}"
            timing.append(row)
    results["flash_mla_timing"] = timing


def check_vit(results, failures):
    import timm

    from encoders.vit import ViT, ViTConfig, convert_timm_state_dict

    torch.backends.cudnn.allow_tf32 = False  # exact float32 patch-embedding convolutions in both
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval().cuda()
    cfg = ViTConfig.from_timm(ref)
    ours = ViT(cfg).eval().cuda()
    ours.load_state_dict(convert_timm_state_dict(ref.state_dict(), cfg))
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        err = (ref.forward_features(x) - ours(x)).abs().max().item()
    results["vit_max_abs_err"] = err
    if err > 1e-3:  # fp32 on CUDA: TF32 is off by default for matmuls
        failures.append(f"ViT: max error {err:.3g} against timm")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_checks.json")
    p.add_argument("--only", default="",
                   help="comma-separated check names (llama, flash_decoding, vit, decode_speed, flash_mla)")
    args = p.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    failures = []
    for check in (check_llama, check_flash_decoding, check_vit, check_decode_speed, check_flash_mla):
        if args.only and check.__name__.removeprefix("check_") not in args.only.split(","):
            continue
        t = time.perf_counter()
        try:
            check(results, failures)
        except Exception:  # keep going: one failing check must not hide the others' results
            failures.append(f"{check.__name__} raised:\n{traceback.format_exc()}")
        results[f"{check.__name__}_seconds"] = time.perf_counter() - t
        results["failures"] = failures
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))
    print(f"{len(failures)} failures" + "".join(f"\n  {f}" for f in failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
