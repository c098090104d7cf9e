"""Small random Hugging Face Llama checkpoints, saved with transformers' own `save_pretrained`."""
import torch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1, rms_norm_eps=1e-2),  # an eps that moves the logits: RMSNorm must read it
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),  # wavelength 32.4 in the 16-64 band
}


def make_hf_llama(path, seed=0, **overrides):
    """Save a random transformers LlamaForCausalLM to `path`; returns the reference model in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random init is ~N(0, 0.02): widen it so logits and greedy paths are not degenerate
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


