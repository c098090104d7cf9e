"""CUDA checks for a lent GPU machine (not collected by pytest: CI has no GPU). Writes JSON results.

Run by tests/gpu/run.sh: Llama parity and generation on CUDA against transformers, the compiled decode step,
the FlashDecoding Triton kernel compiled for the GPU against SDPA (and timed), ViT against timm.
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


def check_llama(results):
    import transformers

    from decoders import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096)
    ref = transformers.LlamaForCausalLM(cfg).eval()
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
            g_ref = r.generate(ids[:1], max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
            g_ours = ours.generate(ids[:1], max_new_tokens=32, eos_token_id=None)
            g_comp = ours.generate(ids[:1], max_new_tokens=32, eos_token_id=None, compile=True)
            long_ids = torch.randint(3, 32000, (1, 1500), device="cuda")  # cache >= 1024: FlashDecoding path
            g_long_ref = r.generate(long_ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
            g_long = ours.generate(long_ids, max_new_tokens=16, eos_token_id=None)
            results[f"llama_{dtype}"] = {"max_abs_err_logits": err, "greedy_equal": torch.equal(g_ref, g_ours),
                                         "compiled_equal": torch.equal(g_ours, g_comp),
                                         "long_context_flashdecoding_equal": torch.equal(g_long_ref, g_long)}


def check_flash_decoding(results):
    from decoders.flash_decoding import flash_decode_triton

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
                rows.append({"dtype": str(dtype), "H": H, "Hkv": Hkv, "D": D, "splits": splits, "max_abs_err": err,
                             "ok": err <= tol})
    results["flash_decoding_correctness"] = rows
    # speed at batch 1, long context: split-KV kernel vs SDPA over the valid prefix
    timing = []
    for S in (4096, 32768, 131072):
        q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, S, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.tensor([S], device="cuda")

        def run_sdpa():
            return F.scaled_dot_product_attention(q.view(1, 8, 4, 128), k, v)

        def run_flash():
            return flash_decode_triton(q, k, v, lens, max(1, min(64, S // 256)))

        row = {"S": S}
        for name, fn in (("sdpa", run_sdpa), ("flash_decoding", run_flash)):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            row[f"{name}_us"] = (time.perf_counter() - t) / 50 * 1e6
        row["speedup"] = row["sdpa_us"] / row["flash_decoding_us"]
        timing.append(row)
    results["flash_decoding_timing"] = timing


def check_vit(results):
    import timm

    from encoders.vit import ViT, ViTConfig, convert_timm_state_dict

    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval().cuda()
    cfg = ViTConfig.from_timm(ref)
    ours = ViT(cfg).eval().cuda()
    ours.load_state_dict(convert_timm_state_dict(ref.state_dict(), cfg))
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad():
        results["vit_max_abs_err"] = (ref.forward_features(x) - ours(x)).abs().max().item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_checks.json")
    args = p.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for check in (check_llama, check_flash_decoding, check_vit):
        t = time.perf_counter()
        try:
            check(results)
        except Exception:  # keep going: one failing check must not hide the others' results
            results[f"{check.__name__}_error"] = traceback.format_exc()
        results[f"{check.__name__}_seconds"] = time.perf_counter() - t
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
