"""Write a Hugging Face Llama as a GGUF file the way llama.cpp's converter does (q/k rows permuted to Meta's
interleaved RoPE order, ggml tensor names), with `gguf.GGUFWriter` and `gguf.quants.quantize`."""
import numpy as np

PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute: halves -> interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, path, kind="F32", embed_kind=None):
    """Save `hf_model` (transformers LlamaForCausalLM) to `path`: 2-D projection weights as `kind`, the embedding
    as `embed_kind` (default `kind`), norms F32."""
    import gguf

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])
    w.add_token_scores([0.0] * cfg.vocab_size)
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    for name, t in hf_model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out, k = "token_embd.weight", embed_kind or kind
        elif name == "lm_head.weight":
            out, k = "output.weight", kind
        elif name == "model.norm.weight":
            out, k = "output_norm.weight", "F32"
        else:
            _, _, i, rest = name.split(".", 3)
            part = PARTS[rest.removesuffix(".weight")]
            out, k = f"blk.{i}.{part}.weight", kind if a.ndim == 2 else "F32"
            if part == "attn_q":
                a = permute(a, cfg.num_attention_heads)
            elif part == "attn_k":
                a = permute(a, cfg.num_key_value_heads)
        qtype = getattr(gguf.GGMLQuantizationType, k)
        if k in ("F32", "F16"):
            w.add_tensor(out, a.astype(np.float32 if k == "F32" else np.float16))
        else:
            w.add_tensor(out, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
