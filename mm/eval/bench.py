"""`mm bench`: our fast paths against the reference libraries, side by side, same weights, one process.

Ratios are the headline (ours / reference, higher is better); absolute numbers only describe the machine.
The references (transformers, timm, espnet) are imported here only, never by the library itself.
"""
from __future__ import annotations

import functools
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

LLAMA_SIZES = {  # name: transformers LlamaConfig kwargs
    "10m": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2),
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),  # TinyLlama-1.1B shape
}


def paired_rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times [repeats] of each function: one warm-up call each, then every function once per round, one after
    another (a shared machine drifts within minutes, so ratios are taken within a round)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def best_time(fn, repeats: int) -> float:
    """Smallest wall time of `repeats` calls (after one warm-up call), waiting for the GPU if there is one."""
    return min(paired_rounds({"fn": fn}, repeats)["fn"])


def put_ratio(row: dict, key: str, ours: list[float], ref: list[float]) -> None:
    """row[key]: the median of the per-round ratios ours / ref (rates), row[key + "_range"]: their [min, max]."""
    ratios = [o / r for o, r in zip(ours, ref)]
    row[key], row[key + "_range"] = statistics.median(ratios), [min(ratios), max(ratios)]


def decode_rounds(gens: dict, row: dict, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """Per-round decode tokens/s of each generator (name -> fn(new_tokens)), paired in time: a round times gen(1)
    (the prefill) and gen(new_tokens) of each. Puts the medians in row (`NAME_prefill_tok_s`, `NAME_decode_tok_s`)
    and returns {name: (prefill rates, decode rates)}."""
    t = paired_rounds({(name, n): functools.partial(gen, n) for name, gen in gens.items() for n in (1, new_tokens)},
                      repeats)
    rates = {}
    for name in gens:
        pre, total = t[name, 1], t[name, new_tokens]
        rates[name] = ([batch * prompt_len / a for a in pre],
                       [batch * (new_tokens - 1) / max(b - a, 1e-9) for a, b in zip(pre, total)])
        row[f"{name}_prefill_tok_s"], row[f"{name}_decode_tok_s"] = map(statistics.median, rates[name])
    return rates


def read_bandwidth(n_bytes: int = 2**30, repeats: int = 5, device: str = "cpu") -> float:
    """Measured memory read bandwidth in bytes/s: summing a large float32 buffer reads each byte once."""
    x = torch.ones(n_bytes // 4, device=device)
    return n_bytes / best_time(lambda: x.sum(), repeats)


def decode_bytes_per_token(model, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table (one row each) plus the KV cache."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed_tokens.weight")
    if model.lm_head is None:  # tied: the head reads the whole table
        weights += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv = 2 * c.num_hidden_layers * batch * c.num_key_value_heads * c.head_dim * context * model.embed_tokens.weight.element_size()
    return weights + kv


def give_clear_choices(embed: torch.Tensor, head: torch.Tensor, embed_std: float = 0.5, seed: int = 0) -> None:
    """Make a random Llama's greedy choices clear: head row perm[t] = embedding row t (`embed`, `head`: [V, d]).

    With plain random weights every next-token distribution is nearly flat, so any two correct bf16
    implementations (different but equally valid rounding) part at the first near-tie, a dozen tokens in. A
    trained model has clear winners; this gives the random one some: the current token's embedding, carried by the
    residual stream, votes for token perm[t] with a margin far above bf16 rounding, while attention and MLPs
    still move every logit. Only the values of two tensors change; shapes, cost and format are those of the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embed.copy_(torch.randn(embed.shape, generator=g) * embed_std)
        perm = torch.randperm(embed.shape[0], generator=g)
        head[perm] = embed / embed.shape[1] ** 0.5


def random_llama(size: str, seed: int = 0) -> "LlamaForCausalLM":
    """Our Llama of `size` (LLAMA_SIZES): random weights (std 0.02, norms 1) with clear greedy choices."""
    from decoders import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_SIZES[size], max_position_embeddings=2048))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    give_clear_choices(model.embed_tokens.weight, model.lm_head.weight, seed=seed)
    return model.eval()


def bench_llama(size: str, dtype: torch.dtype, batch: int, new_tokens: int, prompt_len: int, repeats: int,
                compile: bool, device: str = "cpu") -> dict:
    """Prefill and decode tokens/s of ours vs transformers' `generate`, greedy, on the same random checkpoint, and
    the read bound: the read bandwidth measured just before and just after the timings (the better of the two: a
    shared machine's bandwidth drifts by a third within minutes) over the bytes a decode step reads."""
    import transformers

    from decoders import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**LLAMA_SIZES[size], max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    give_clear_choices(ref.model.embed_tokens.weight, ref.lm_head.weight)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = LlamaForCausalLM.from_pretrained(d, dtype=dtype, device=device)
    ref = ref.to(device=device, dtype=dtype)
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)

    def ref_gen(n):
        return ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    def our_gen(n):
        return ours.generate(ids, max_new_tokens=n, eos_token_id=None, compile=compile)

    with torch.inference_mode():
        a, b = ref_gen(new_tokens), our_gen(new_tokens)  # also warms up (and compiles) both
        differ = (a != b).any(dim=0).nonzero()
        ref_logits, our_logits = ref(a).logits.float(), ours(a).float()  # both read the same tokens
        row = {"model": size, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "new_tokens": new_tokens,
               "same_tokens": not len(differ), "compiled": compile,
               "first_difference": int(differ[0]) - prompt_len if len(differ) else None,
               # over every position of the generated sequences, relative to the largest logit
               "logit_err": float((ref_logits - our_logits).abs().max() / ref_logits.abs().max())}
        bandwidth = read_bandwidth(device=device)
        rates = decode_rounds({"ref": ref_gen, "ours": our_gen}, row, batch, prompt_len, new_tokens, repeats)
    put_ratio(row, "decode_ratio", rates["ours"][1], rates["ref"][1])
    put_ratio(row, "prefill_ratio", rates["ours"][0], rates["ref"][0])
    bandwidth = max(bandwidth, read_bandwidth(device=device))
    row["read_GB_s"] = bandwidth / 1e9
    per_token = decode_bytes_per_token(ours, batch, prompt_len + new_tokens // 2)
    row["read_bound_tok_s"] = bandwidth / per_token * batch  # tokens/s if every byte were read once at that rate
    row["fraction_of_bound"] = row["ours_decode_tok_s"] / row["read_bound_tok_s"]
    return row


MOE_SIZES = {  # name: (transformers class prefix, config kwargs); same 4-layer width, MLA + DeepSeekMoE vs GQA + top-2
    "v3-small": ("DeepseekV3", dict(vocab_size=8000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                                    num_hidden_layers=4, num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128,
                                    qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=32,
                                    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                                    first_k_dense_replace=1)),
    "mixtral-small": ("Mixtral", dict(vocab_size=8000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                      num_experts_per_tok=2)),
}


def bench_moe(name: str, dtype: torch.dtype, batch: int, new_tokens: int, prompt_len: int, repeats: int,
              compile: bool = False, device: str = "cpu") -> dict:
    """Decode tokens/s of our DeepseekForCausalLM against transformers' generate on the same random checkpoint:
    transformers' default experts kernel (grouped_mm in 5.x) and its per-expert loop ("eager"), greedy, same tokens."""
    import transformers

    from decoders import DeepseekForCausalLM

    prefix, kw = MOE_SIZES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{prefix}Config")(**kw, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    ref = getattr(transformers, f"{prefix}ForCausalLM")(cfg).eval()
    give_clear_choices(ref.model.embed_tokens.weight, ref.lm_head.weight)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = DeepseekForCausalLM.from_pretrained(d, dtype=dtype, device=device)
        ref = getattr(transformers, f"{prefix}ForCausalLM").from_pretrained(d, dtype=dtype).to(device).eval()
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), device=device)

    def ref_gen(n):
        return ref.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)

    def our_gen(n):
        return ours.generate(ids, max_new_tokens=n, eos_token_id=None, compile=compile)

    def loop_gen(n):  # transformers' per-expert loop
        ref.set_experts_implementation("eager")
        try:
            return ref_gen(n)
        finally:
            ref.set_experts_implementation(default)

    default = ref.config._experts_implementation
    row = {"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "new_tokens": new_tokens,
           "compiled": compile, "experts": f"{kw.get('n_routed_experts', kw.get('num_local_experts'))} top-{kw['num_experts_per_tok']}"}
    with torch.inference_mode():
        a, b = ref_gen(new_tokens), our_gen(new_tokens)
        differ = (a != b).any(dim=0).nonzero()
        row["same_tokens"], row["first_difference"] = not len(differ), int(differ[0]) - prompt_len if len(differ) else None
        ref_logits, our_logits = ref(a).logits.float(), ours(a).float()
        row["logit_err"] = float((ref_logits - our_logits).abs().max() / ref_logits.abs().max())
        rates = decode_rounds({"ref": ref_gen, "ref_loop": loop_gen, "ours": our_gen}, row, batch, prompt_len,
                              new_tokens, repeats)
    put_ratio(row, "decode_ratio", rates["ours"][1], rates["ref"][1])
    put_ratio(row, "ratio_vs_loop", rates["ours"][1], rates["ref_loop"][1])
    return row


def bench_mla_cache(tokens: int = 4096) -> list[dict]:
    """Measured cache bytes of DeepSeek-V3's MLA (61 layers, latent 512 + rope 64) against GQA and MHA of the same
    width (128 heads of 128: what MLA's per-head keys and values would take), bf16, one sequence."""
    from decoders import KVCache
    from decoders.mla import LatentCache, latent_cache_bytes

    mla = LatentCache(61, 1, 512 + 64, tokens, torch.bfloat16, device="meta")
    rows = [{"attention": "MLA (latent)", "per_token_per_layer": 512 + 64, "bytes": mla.nbytes,
             "formula": latent_cache_bytes(512, 64, 61, tokens), "equal": mla.nbytes == latent_cache_bytes(512, 64, 61, tokens)}]
    for name, kv_heads in (("GQA 8 kv heads", 8), ("MHA 128 heads", 128)):
        cache = KVCache(61, 1, kv_heads, 128, tokens, torch.bfloat16, device="meta")
        formula = 2 * 61 * kv_heads * 128 * tokens * 2
        rows.append({"attention": name, "per_token_per_layer": 2 * kv_heads * 128, "bytes": cache.nbytes,
                     "formula": formula, "equal": cache.nbytes == formula})
    for r in rows:
        r["vs_mla"] = r["bytes"] / mla.nbytes
    return rows


def bench_kv_cache() -> list[dict]:
    """Measured KV cache bytes against 2 x layers x batch x kv_heads x head_dim x tokens x bytes (MHA/GQA/MQA)."""
    from decoders import KVCache

    rows = []
    for name, kv_heads in (("MHA", 32), ("GQA", 8), ("MQA", 1)):
        layers, batch, head_dim, tokens = 32, 1, 128, 4096
        cache = KVCache(layers, batch, kv_heads, head_dim, tokens, dtype=torch.bfloat16, device="meta")
        formula = 2 * layers * batch * kv_heads * head_dim * tokens * 2
        rows.append({"attention": name, "kv_heads": kv_heads, "bytes": cache.nbytes, "formula": formula,
                     "equal": cache.nbytes == formula, "vs_mha": cache.nbytes / (2 * layers * batch * 32 * head_dim * tokens * 2)})
    return rows


def bench_vit(batch: int, repeats: int, dtype: torch.dtype = torch.float32, compile: bool = False) -> dict:
    """Images/s of our ViT against timm's on the same `vit_base_patch16_224` weights, both eager or both through
    `torch.compile` (with `compile`, timm eager too: `ref_eager_img_s`, `ratio_vs_eager`, as most timm users run it)."""
    import timm

    from encoders.vit import ViT, ViTConfig, convert_timm_state_dict

    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    cfg = ViTConfig.from_timm(ref)
    ours = ViT(cfg).eval()
    ours.load_state_dict(convert_timm_state_dict(ref.state_dict(), cfg))
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(batch, 3, 224, 224).to(dtype)
    fns = {"ref": ref.forward_features, "ours": ours}
    if compile:
        fns = {"ref": torch.compile(ref.forward_features), "ours": torch.compile(ours), "ref_eager": fns["ref"]}
    with torch.inference_mode():
        err = (fns["ref"](x).float() - fns["ours"](x).float()).abs().max().item()
        t = paired_rounds({k: functools.partial(f, x) for k, f in fns.items()}, repeats)
    row = {"model": "vit_base_patch16_224", "dtype": str(dtype).removeprefix("torch."), "compiled": compile,
           "batch": batch, "max_abs_err": err, **{f"{k}_img_s": batch / statistics.median(v) for k, v in t.items()}}
    put_ratio(row, "ratio", t["ref"], t["ours"])  # times: ref / ours is ours' speed-up
    if compile:
        put_ratio(row, "ratio_vs_eager", t["ref_eager"], t["ours"])
    return row


def bench_speech_encoder(seconds: float = 10.0, repeats: int = 3) -> dict:
    """Real-time factor of our E-Branchformer encoder against ESPnet's on the same weights (Dolphin-base width)."""
    from espnet2.asr.encoder.e_branchformer_encoder import EBranchformerEncoder as ESPnetEncoder

    from encoders.convert_espnet import load_espnet_encoder
    from encoders.ebranchformer import EBranchformerConfig

    conf = dict(output_size=512, attention_heads=8, linear_units=2048, cgmlp_linear_units=2048, num_blocks=6,
                input_layer="conv2d", pos_enc_layer_type="rel_pos", rel_pos_type="latest",
                attention_layer_type="rel_selfattn", cgmlp_conv_kernel=31, use_linear_after_conv=False,
                gate_activation="identity", merge_conv_kernel=31, dropout_rate=0.0, positional_dropout_rate=0.0,
                attention_dropout_rate=0.0)
    torch.manual_seed(0)
    ref = ESPnetEncoder(input_size=80, **conf).eval()
    ours = load_espnet_encoder({f"encoder.{k}": v for k, v in ref.state_dict().items()},
                               EBranchformerConfig.from_espnet(conf)).eval()
    frames = int(seconds * 100) + 1
    feats, lengths = torch.randn(1, frames, 80), torch.tensor([frames])
    with torch.inference_mode():
        want, _, _ = ref(feats, lengths)
        got, _ = ours(feats, lengths)
        t = paired_rounds({"ref": lambda: ref(feats, lengths), "ours": lambda: ours(feats, lengths)}, repeats)
    row = {"model": "e_branchformer d512 x6", "audio_s": seconds, "max_abs_err": (got - want).abs().max().item(),
           "ref_rtf": statistics.median(t["ref"]) / seconds, "ours_rtf": statistics.median(t["ours"]) / seconds}
    put_ratio(row, "speedup", t["ref"], t["ours"])
    return row


def format_table(rows: list[dict], cols: list[str]) -> str:
    """A plain-text table of `rows` restricted to `cols`."""
    def fmt(v):
        if isinstance(v, list):  # a [min, max] range
            return "-".join(map(fmt, v))
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def run(sizes=("10m", "125m"), dtypes=("float32", "bfloat16"), batches=(1, 8), new_tokens=128, prompt_len=16,
        repeats=3, compile=True, vit=True, speech=True, device="cpu", out: str | None = None, log=print,
        moe=("v3-small", "mixtral-small")) -> dict:
    """Run the benchmark grid, print tables, and write JSON to `out` if given."""
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "device": device,
                          "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                          "threads": torch.get_num_threads(), "torch": torch.__version__}}
    log(f"{torch.get_num_threads()} threads; read bandwidth measured around each decoder row")
    rows = []
    for size in sizes:
        for dt in dtypes:
            for b in batches:
                row = bench_llama(size, getattr(torch, dt), b, new_tokens, prompt_len, repeats, compile, device)
                rows.append(row)
                log(format_table([row], ["model", "dtype", "batch", "ref_decode_tok_s", "ours_decode_tok_s",
                                         "decode_ratio", "decode_ratio_range", "prefill_ratio", "fraction_of_bound", "same_tokens",
                                         "logit_err"]).splitlines()[-1])
    result["llama"] = rows
    log("\n" + format_table(rows, ["model", "dtype", "batch", "ref_decode_tok_s", "ours_decode_tok_s", "decode_ratio",
                                   "decode_ratio_range", "ref_prefill_tok_s", "ours_prefill_tok_s", "prefill_ratio", "read_GB_s", "read_bound_tok_s",
                                   "fraction_of_bound", "same_tokens", "first_difference", "logit_err"]))
    result["kv_cache"] = bench_kv_cache()
    log("\n" + format_table(result["kv_cache"], ["attention", "kv_heads", "bytes", "formula", "equal", "vs_mha"]))
    moe_cols = ["model", "experts", "dtype", "batch", "ref_decode_tok_s", "ref_loop_decode_tok_s", "ours_decode_tok_s",
                "decode_ratio", "decode_ratio_range", "ratio_vs_loop", "same_tokens", "logit_err"]
    result["moe"] = [bench_moe(m, getattr(torch, dt), b, min(new_tokens, 32), prompt_len, repeats, compile, device)
                     for m in moe for dt in dtypes for b in batches]
    if moe:
        log("\n" + format_table(result["moe"], moe_cols))
    result["mla_cache"] = bench_mla_cache()
    log("\n" + format_table(result["mla_cache"], ["attention", "per_token_per_layer", "bytes", "formula", "equal", "vs_mla"]))
    if vit:  # float32 eager; compiled, the bf16 rows too (ours and timm both compiled, and timm eager)
        result["vit"] = [bench_vit(batch=8, repeats=repeats)] + [
            bench_vit(b, repeats, torch.bfloat16, compile=True) for b in ((8, 32) if compile else ())]
        log("\n" + format_table(result["vit"], ["model", "dtype", "compiled", "batch", "ref_img_s", "ours_img_s", "ratio",
                                                "ratio_range", "ref_eager_img_s", "ratio_vs_eager", "max_abs_err"]))
    if speech:
        result["speech_encoder"] = bench_speech_encoder(repeats=repeats)
        log("\n" + format_table([result["speech_encoder"]], ["model", "audio_s", "ref_rtf", "ours_rtf", "speedup", "speedup_range",
                                                             "max_abs_err"]))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        log(f"\nwrote {out}")
    return result
