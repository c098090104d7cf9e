"""GGUF files (llama.cpp) <-> our Llama decoder, with the `gguf` package; F32, F16, BF16, Q8_0, Q4_0, Q4_1.

Block layouts (ggml `ggml-common.h`), 32 weights along the input dimension per block:
    Q8_0  fp16 d, int8 q[32]                         w = d * q
    Q4_0  fp16 d, uint8 qs[16]                       w = d * (q - 8)
    Q4_1  fp16 d, fp16 m, uint8 qs[16]               w = d * q + m
    (4-bit: weight j < 16 is qs[j] & 0xF, weight j + 16 is qs[j] >> 4)
llama.cpp's converter permutes the q and k rows of each head to Meta's interleaved RoPE order; `unpermute` undoes it.
With `quantized=True` the Q4_0/Q4_1 projections stay 4-bit in memory as `Int4Linear` (groups of 32): u = q,
scale d, offset 0 (Q4_0) or m + 8 d (Q4_1), scales and offsets rounded to bfloat16 (the kernel's dtype); everything
else (Q8_0: no kernel takes 32-wide int8 groups; the embeddings, norms) is dequantized to `dtype`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError
from .llama import LlamaConfig, LlamaForCausalLM
from .qlinear import Int4Linear

BLOCK = 32
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
GLOBAL_KEYS = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
               "output_norm.weight": "model.norm.weight"}
LAYER_KEYS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, source: str) -> LlamaConfig:
    """The Llama config of a GGUF file's `llama.*` metadata."""
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{source}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    tokens = field(reader, "tokenizer.ggml.tokens")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, heads = field(reader, "llama.embedding_length"), field(reader, "llama.attention.head_count")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=field(reader, "llama.vocab_size") or (len(tokens) if tokens else int(emb.shape[1])),
        hidden_size=hidden, intermediate_size=field(reader, "llama.feed_forward_length"),
        num_hidden_layers=field(reader, "llama.block_count"), num_attention_heads=heads,
        num_key_value_heads=field(reader, "llama.attention.head_count_kv", heads),
        head_dim=field(reader, "llama.attention.key_length", hidden // heads),
        rms_norm_eps=float(field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=field(reader, "llama.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"), eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"))


def blocks(t, size: int) -> np.ndarray:
    """A quantized tensor's raw bytes as [rows, blocks per row, bytes per block = size]."""
    rows = int(np.prod(t.shape[1:]))
    return np.asarray(t.data, dtype=np.uint8).reshape(rows, -1, size)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """4-bit codes [rows, nb, 32] of the 16 bytes per block: low nibbles are weights 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_4bit(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0/Q4_1 -> codes q [rows, cols] (0..15), d [rows, cols/32], m [rows, cols/32] (Q4_0: m = -8 d)."""
    kind = t.tensor_type.name
    size = 18 if kind == "Q4_0" else 20
    b = blocks(t, size)  # [rows, nb, size]
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if kind == "Q4_1" else -8 * d
    q = nibbles(b[..., size - 16:])
    return torch.from_numpy(q.reshape(q.shape[0], -1).astype(np.int32)), torch.from_numpy(d), torch.from_numpy(m)


def dequantize(t) -> torch.Tensor:
    """A GGUF tensor as float32 [rows, cols] (numpy's row-major shape: ggml's ne reversed)."""
    kind = t.tensor_type.name
    shape = tuple(int(s) for s in reversed(t.shape))
    if kind in FLOAT_TYPES:
        return torch.from_numpy(np.asarray(t.data).astype(np.float32).reshape(shape))
    if kind == "BF16":
        raw = np.asarray(t.data).view(np.uint16).astype(np.int32) << 16
        return torch.from_numpy(raw.view(np.float32).reshape(shape))
    if kind == "Q8_0":
        b = blocks(t, 34)
        d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [rows, nb, 1]
        q = b[..., 2:].view(np.int8).astype(np.float32)
        return torch.from_numpy((d * q).reshape(shape))
    if kind in ("Q4_0", "Q4_1"):
        q, d, m = decode_4bit(t)
        w = q.float().view(q.shape[0], -1, BLOCK) * d[..., None] + m[..., None]
        return w.reshape(shape)
    raise CheckpointError(f"tensor {t.name}: GGUF type {kind} is not supported (supported: {', '.join(SUPPORTED)})")


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (Hugging Face's RoPE halves -> Meta's interleaved pairs), rows [H*D]."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (Meta's interleaved RoPE pairs -> Hugging Face's halves), rows [H*D]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def open_gguf(path: str | Path, error: type[Exception] = CheckpointError):
    """A `gguf.GGUFReader` of the file; missing or unreadable, an `error` naming it."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from e
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors on foreign bytes
        raise error(f"{path}: not a readable GGUF file ({e})") from None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              quantized: bool = True) -> LlamaForCausalLM:
    """Open a llama GGUF file as our LlamaForCausalLM (Q4_0/Q4_1 projections as Int4Linear when `quantized`)."""
    path = Path(path)
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    hf, four_bit = {}, {}
    for t in reader.tensors:
        part = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if t.name in GLOBAL_KEYS:
            key = GLOBAL_KEYS[t.name]
        elif part in LAYER_KEYS:
            _, i, part, _ = t.name.split(".")
            key = f"model.layers.{i}.{LAYER_KEYS[part]}.weight"
        else:
            continue  # e.g. rope_freqs: recomputed from the config
        try:
            w = dequantize(t)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from e
        if quantized and t.tensor_type.name in ("Q4_0", "Q4_1") and key.startswith(("model.layers.", "lm_head.")):
            four_bit[key] = decode_4bit(t)
        heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(part)
        if heads:
            w = unpermute(w, heads)
            if key in four_bit:
                four_bit[key] = tuple(unpermute(x, heads) for x in four_bit[key])
        hf[key] = w
    from .convert_hf import convert_hf_state_dict

    model = LlamaForCausalLM.from_state_dict(cfg, convert_hf_state_dict(hf, cfg, str(path)), dtype, device, str(path))
    if four_bit:
        swap_4bit(model, four_bit)
    return model.eval()


def swap_4bit(model: LlamaForCausalLM, four_bit: dict) -> None:
    """Replace the projections whose every part was 4-bit by Int4Linear (fused q/k/v and gate/up: rows stacked), and
    a 4-bit head (a quarter of a 125M model's weights)."""
    if "lm_head.weight" in four_bit and model.config.vocab_size % 16 == 0:  # the kernel's row multiple
        q, d, m = four_bit["lm_head.weight"]
        model.lm_head = Int4Linear(q, d, m + 8 * d, 4, BLOCK)
    fused = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj"),
             "self_attn.o_proj": ("o_proj",), "mlp.down_proj": ("down_proj",)}
    for i in range(model.config.num_hidden_layers):
        for ours, parts in fused.items():
            mod = ours.split(".")[0]
            keys = [f"model.layers.{i}.{mod}.{p}.weight" for p in parts]
            if all(k in four_bit for k in keys):
                q, d, m = (torch.cat([four_bit[k][j] for k in keys]) for j in range(3))
                lin = Int4Linear(q, d, m + 8 * d, 4, BLOCK)  # w = (q - 8) d + (m + 8 d) = q d + m
                parent = model.layers[i].get_submodule(mod)
                setattr(parent, ours.split(".")[1], lin)


def write_metadata(w, c: LlamaConfig, tokenizer=None) -> None:
    """The `llama.*` hyper-parameters of `c` and the tokenizer (placeholders without one, see `save_gguf`)."""
    import gguf

    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    if tokenizer is not None:
        tokenizer.write_metadata(w)
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"<t{i}>" for i in range(3, c.vocab_size)])
        w.add_token_scores([0.0] * c.vocab_size)
        w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                          + [gguf.TokenType.USER_DEFINED] * (c.vocab_size - 3))
        w.add_bos_token_id(1 if c.bos_token_id is None else c.bos_token_id)
        w.add_eos_token_id(2 if c.eos_token_id is None else c.eos_token_id)


def save_gguf(model: LlamaForCausalLM, path: str | Path, kind: str = "F32", embed_kind: str | None = None,
              tokenizer=None) -> Path:
    """Write `model` (float weights) as llama.cpp's converter writes a Hugging Face Llama: 2-D projections (and the
    head) as `kind` (a ggml type name that `gguf.quants` writes), the embedding as `embed_kind` (default `kind`),
    norms F32, q/k rows permuted; quantized kinds fall back to F16 where a row is not whole blocks of 32, as
    llama.cpp's converter does.

    `tokenizer` (a `decoders.tokenizer_gguf.GGUFTokenizer` of as many tokens as the model's vocabulary): its
    `tokenizer.*` metadata is written. Without it the token list is placeholders: <unk> <s> </s>, then `<tN>` for id
    N, marked user-defined, so llama.cpp reads the text `<t5><t17>` as ids 5, 17 and prints id N as `<tN>`."""
    import gguf

    from .convert_hf import to_hf_state_dict

    c, path = model.config, Path(path)
    for k in (kind, embed_kind or kind):
        if not hasattr(gguf.GGMLQuantizationType, k):
            raise ValueError(f"{k!r} is not a GGUF tensor type (ours load {', '.join(SUPPORTED)})")
    if tokenizer is not None and tokenizer.vocab_size != c.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
                         f"{c.vocab_size}")
    w = gguf.GGUFWriter(str(path), "llama")
    write_metadata(w, c, tokenizer)
    names = {ours: theirs for theirs, ours in GLOBAL_KEYS.items()}
    names.update({f"model.layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight"
                  for i in range(c.num_hidden_layers) for theirs, ours in LAYER_KEYS.items()})
    for name, t in to_hf_state_dict(model.state_dict(), c).items():
        out = names[name]
        a = t.detach().float()
        part = out.split(".")[2] if out.startswith("blk.") else ""
        if part in ("attn_q", "attn_k"):
            a = permute(a, c.num_attention_heads if part == "attn_q" else c.num_key_value_heads)
        k = "F32" if a.dim() == 1 else (embed_kind or kind) if out == "token_embd.weight" else kind
        if k not in FLOAT_TYPES and k != "BF16" and a.shape[-1] % BLOCK:
            k = "F16"  # rows that are not whole blocks: F16, as llama.cpp's converter falls back
        a = a.numpy()
        if k in FLOAT_TYPES:
            w.add_tensor(out, a.astype(FLOAT_TYPES[k]))
        else:
            qtype = getattr(gguf.GGMLQuantizationType, k)
            w.add_tensor(out, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
