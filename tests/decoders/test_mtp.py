"""DeepSeek-V3 multi-token prediction: a checkpoint with the extra `model.layers.{N}` module (as DeepSeek-V3 ships it,
built here by adding transformers' own MtpModel weights to a saved checkpoint), logits and loss against transformers'
MtpModel, the round trip, and self-speculative decoding giving exactly the greedy tokens."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from decoders import next_token_loss
from decoders.deepseek import DeepseekConfig, DeepseekForCausalLM
from decoders.mtp import mtp_logits, mtp_loss, speculative_generate

from tests.decoders.test_deepseek import make_hf

N_LAYERS = 3  # the test models' num_hidden_layers: the MTP module is layer 3


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_mtp_keys(mtp, main) -> dict:
    """transformers' MtpModel weights -> DeepSeek-V3 checkpoint keys `model.layers.3.*` (per-expert matrices, the
    head's and embedding's copies), written out here independently of the library's converter."""
    out, prefix = {}, f"model.layers.{N_LAYERS}."
    for k, v in mtp.state_dict().items():
        name = k.removeprefix("layers.0.")
        if name.startswith("mtp_block.mlp.experts."):
            kind = name.rsplit(".", 1)[1]
            for e, w in enumerate(v):
                if kind == "gate_up_proj":
                    gate, up = w.chunk(2)
                    out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate
                    out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up
                else:
                    out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = w
        elif name.startswith("mtp_block."):
            out[prefix + name.removeprefix("mtp_block.")] = v
        elif name == "post_norm.weight":
            out[prefix + "shared_head.norm.weight"] = v
        elif name in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            out[prefix + name] = v
    out[prefix + "embed_tokens.weight"] = main.model.embed_tokens.weight
    out[prefix + "shared_head.head.weight"] = main.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def v3_with_mtp(tmp_path_factory):
    """(checkpoint dir with an MTP layer, transformers main model, transformers MtpModel with the same weights)."""
    from transformers.modeling_layers import MtpModel

    path = tmp_path_factory.mktemp("v3_mtp")
    ref = make_hf(path, "v3")
    mtp = MtpModel(ref, 1).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in mtp.named_parameters():
            if n.startswith("layers."):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 if p.dim() > 1 else torch.rand(p.shape, generator=g) + 0.5)
        for n, b in mtp.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    weights = load_file(path / "model.safetensors")
    save_file({**weights, **hf_mtp_keys(mtp, ref)}, path / "model.safetensors", metadata={"format": "pt"})
    return path, ref, mtp


def test_mtp_logits_and_loss_match_transformers_mtp_model(v3_with_mtp):
    path, ref, mtp = v3_with_mtp
    ours = DeepseekForCausalLM.from_pretrained(path)
    assert ours.mtp is not None and len(ours.mtp.layers) == 1
    ids = torch.randint(3, 97, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden_ref = ref(ids, output_hidden_states=True).hidden_states[-1]  # the main model's normalised output
        positions = torch.arange(1, 14).expand(2, 13)  # the MTP module reads token i + 1 at position i
        expected = mtp._project_to_logits(mtp.forward_layer(0, hidden_ref[:, :-1], positions, None, input_ids=ids[:, 1:]))
        logits, hidden = ours(ids, return_hidden=True)
        (got,) = mtp_logits(ours, hidden, ids)
        loss = mtp_loss(ours, hidden, ids, weight=0.3)
    assert (hidden - hidden_ref).abs().max() / hidden_ref.abs().max() < 1e-5
    assert got.shape == (2, 13, 97) and ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
    # position i predicts token i + 2: the loss is the cross entropy against the ids two ahead, times the weight
    assert loss.item() == pytest.approx(0.3 * F.cross_entropy(expected[:, :-1].reshape(-1, 97), ids[:, 2:].reshape(-1)).item(), rel=1e-4)


def test_checkpoint_round_trip_keeps_the_mtp_layer(v3_with_mtp, tmp_path):
    import transformers

    path, ref, _ = v3_with_mtp
    ours = DeepseekForCausalLM.from_pretrained(path)
    ours.save_pretrained(tmp_path)
    original, saved = load_file(path / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()  # it skips the extra layer
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


def test_speculative_decoding_gives_the_greedy_tokens_of_a_random_model(v3_with_mtp):
    path, _, _ = v3_with_mtp
    model = DeepseekForCausalLM.from_pretrained(path)
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(1))
    stats = {}
    got = speculative_generate(model, ids, max_new_tokens=30, eos_token_id=None, stats=stats)
    assert torch.equal(got, model.generate(ids, max_new_tokens=30, eos_token_id=None))
    assert stats["new_tokens"] == 30 and 0 <= stats["acceptance"] <= 1


def counting_batch(g, batch=16, T=24, V=50):
    """Sequences that count up modulo V from random starts: the next token and the one after are both certain."""
    return (torch.randint(0, V, (batch, 1), generator=g) + torch.arange(T)) % V


def test_trained_mtp_head_drafts_accepted_tokens_and_output_stays_greedy():
    torch.manual_seed(0)
    cfg = DeepseekConfig(vocab_size=50, hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                         v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                         first_k_dense_replace=1, max_position_embeddings=128, eos_token_id=None, bos_token_id=None)
    model = DeepseekForCausalLM(cfg, mtp_depth=1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.ones_(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        x = counting_batch(g)
        logits, hidden = model(x, return_hidden=True)
        loss = next_token_loss(logits, x) + mtp_loss(model, hidden, x, weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompt = counting_batch(g, batch=1, T=6)
    stats = {}
    got = speculative_generate(model, prompt, max_new_tokens=40, eos_token_id=None, stats=stats)
    assert torch.equal(got, model.generate(prompt, max_new_tokens=40, eos_token_id=None))
    assert stats["acceptance"] > 0.8 and stats["tokens_per_pass"] > 1.8


def test_without_mtp_layers_speculative_decoding_says_so(tmp_path):
    make_hf(tmp_path, "v3")
    model = DeepseekForCausalLM.from_pretrained(tmp_path)
    assert model.mtp is None
    with pytest.raises(ValueError, match="needs the model's MTP modules"):
        speculative_generate(model, torch.tensor([[5, 6]]))
