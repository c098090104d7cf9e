"""Routers against transformers' own (Mixtral, DeepSeek-V2 greedy / group-limited, DeepSeek-V3), expert dispatch against
transformers' per-expert loop, and the DeepSeek-V3 balancing tools against their formulas."""
import pytest
import torch

from decoders.moe import Experts, MoE, Router, load_imbalance, sequence_balance_loss, update_bias

D, E = 32, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_router(kind, **kw):
    """(transformers router with random weights, our Router with the same weights and options)."""
    from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    g = torch.Generator().manual_seed(0)
    if kind == "mixtral":
        ref = MixtralTopKRouter(MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=2))
        ours = Router(D, E, 2, "softmax", norm_topk_prob=True)
    elif kind.startswith("v2"):
        method = "group_limited_greedy" if kind == "v2_grouped" else "greedy"
        ref = DeepseekV2TopkRouter(DeepseekV2Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4,
                                                    topk_method=method, n_group=4, topk_group=2, routed_scaling_factor=1.7))
        ours = Router(D, E, 4, "softmax", *((4, 2, "max") if method != "greedy" else ()), norm_topk_prob=False, scaling=1.7)
    else:
        ref = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4, n_group=4,
                                                    topk_group=2, routed_scaling_factor=2.5))
        ours = Router(D, E, 4, "sigmoid", 4, 2, "top2", norm_topk_prob=True, scaling=2.5, correction_bias=True)
        ref.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.2)
        ours.e_score_correction_bias.copy_(ref.e_score_correction_bias)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, D, generator=g))
        ours.weight.copy_(ref.weight)
    return ref, ours


@pytest.mark.parametrize("kind", ["mixtral", "v2_greedy", "v2_grouped", "v3"])
def test_router_chooses_and_weighs_as_transformers(kind):
    ref, ours = hf_router(kind)
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, ref_w, ref_i = ref(x)
        w, i, scores = ours(x)
    # same experts (the order within a row is free) with the same weight each
    ref_order, order = ref_i.argsort(dim=-1), i.argsort(dim=-1)
    assert torch.equal(ref_i.gather(1, ref_order), i.gather(1, order))
    assert (ref_w.gather(1, ref_order) - w.gather(1, order)).abs().max() < 1e-6
    if kind == "v3":  # the correction bias changes the choice of many tokens, never the weights' source
        ours.e_score_correction_bias.zero_()
        _, i0, _ = ours(x)
        assert (i0.sort(dim=-1).values != i.sort(dim=-1).values).any(dim=-1).float().mean() > 0.2
    if kind in ("v2_grouped", "v3"):  # every token's experts lie in at most topk_group = 2 groups of 4
        assert ((i // 4).sort(dim=-1).values.diff(dim=-1) != 0).sum(dim=-1).max() <= 1


def make_experts(seed=0, hidden=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    experts = Experts(E, D, hidden).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * hidden, D, generator=g) * D ** -0.5)
        experts.down_proj.copy_(torch.randn(E, D, hidden, generator=g) * hidden ** -0.5)
    return experts


@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_sorted_dispatch_equals_transformers_per_expert_loop(tokens):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    ours = make_experts()
    ref = DeepseekV3Experts(DeepseekV3Config(hidden_size=D, n_routed_experts=E, moe_intermediate_size=24))
    with torch.no_grad():
        ref.gate_up_proj.copy_(ours.gate_up_proj)  # transformers keeps the same stacked layout in memory
        ref.down_proj.copy_(ours.down_proj)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, D, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:4] for _ in range(tokens)])  # [N, 4]
    weights = torch.rand(tokens, 4, generator=g)
    with torch.no_grad():
        expected = ref(x, experts, weights)
        got, counts = ours(x, weights, experts)
        ours.use_grouped_mm = False
        looped, _ = ours(x, weights, experts)
        gathered = ours.gathered(x, weights, experts.reshape(-1))  # the compiled decode step's form
    assert (got - expected).abs().max() < 1e-5 and (looped - expected).abs().max() < 1e-5
    assert (gathered - expected).abs().max() < 1e-5
    assert torch.equal(counts, torch.bincount(experts.reshape(-1), minlength=E))


def test_grouped_and_looped_dispatch_agree_in_bfloat16():
    ours = make_experts(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, D, generator=g).bfloat16()
    experts = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(64)])
    weights = torch.rand(64, 2, generator=g)
    with torch.no_grad():
        got, _ = ours(x, weights, experts)
        ours.use_grouped_mm = False
        looped, _ = ours(x, weights, experts)
    assert (got.float() - looped.float()).abs().max() <= 0.02 * looped.float().abs().max()


@pytest.mark.parametrize("grouped", [True, False])
def test_one_token_reads_only_its_chosen_experts(grouped):
    ours = make_experts()
    ours.use_grouped_mm = grouped
    chosen = torch.tensor([[3, 11]])
    x = torch.randn(1, D)
    with torch.no_grad():
        expected, _ = ours(x, torch.ones(1, 2), chosen)
        for e in set(range(E)) - {3, 11}:  # poison every other expert: any read of them would turn the output NaN
            ours.gate_up_proj[e].fill_(float("nan"))
            ours.down_proj[e].fill_(float("nan"))
        got, _ = ours(x, torch.ones(1, 2), chosen)
    assert torch.equal(got, expected)


def test_bias_update_follows_the_sign_rule():
    moe = MoE(D, 8, E, 0, Router(D, E, 2, "sigmoid", correction_bias=True))
    load = torch.tensor([6.0, 0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 1, 5])  # mean 3: 0, 15 over; 1, 14 under
    moe.tokens_per_expert.copy_(load)
    before = moe.gate.e_score_correction_bias.clone()
    (used,) = update_bias(moe, gamma=0.01)
    step = moe.gate.e_score_correction_bias - before
    assert torch.equal(used, load) and moe.tokens_per_expert.sum() == 0
    assert step[0] == step[15] == pytest.approx(-0.01) and step[1] == step[14] == pytest.approx(0.01)
    assert torch.equal(step[2:14], torch.zeros(12))


def test_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    moe = MoE(D, 8, E, 0, Router(D, E, 2, "sigmoid", correction_bias=True)).train()
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.2)
        moe.gate.weight[:3, 0] += 1.0  # experts 0-2 read feature 0, which every token has: they attract most tokens
        torch.nn.init.normal_(moe.experts.gate_up_proj)
        torch.nn.init.normal_(moe.experts.down_proj)
    g = torch.Generator().manual_seed(1)
    loads = []
    for _ in range(150):
        x = torch.randn(8, 256, D, generator=g)
        x[..., 0] += 2
        with torch.no_grad():
            moe(x)
        loads += update_bias(moe, gamma=0.01)
    assert loads[0].sum() == 8 * 256 * 2
    assert load_imbalance(loads[0]) > 3  # max/mean of the first step's tokens per expert
    assert sorted(load_imbalance(load) for load in loads[-50:])[25] < 1.3  # the median step of the last 50
    assert load_imbalance(sum(loads[-50:])) < 1.05  # and all of them together


def test_sequence_balance_loss_equals_its_formula():
    torch.manual_seed(0)
    moe = MoE(D, 8, E, 0, Router(D, E, 3, "sigmoid", correction_bias=True)).train()
    torch.nn.init.normal_(moe.gate.weight)
    torch.nn.init.normal_(moe.experts.gate_up_proj)
    torch.nn.init.normal_(moe.experts.down_proj)
    x = torch.randn(2, 10, D)
    moe(x)
    loss = sequence_balance_loss(moe, alpha=0.5)
    expected = 0.0
    for b in range(2):  # written out per sequence and expert, as in the DeepSeek-V3 report (eqs. 17-20)
        s = (x[b] @ moe.gate.weight.detach().T).sigmoid()  # [T, E]
        top = (s + moe.gate.e_score_correction_bias).topk(3, dim=-1).indices
        for i in range(E):
            f = E / (3 * 10) * sum(int(i in top[t]) for t in range(10))
            p = sum(s[t, i] / s[t].sum() for t in range(10)) / 10
            expected += 0.5 * f * p / 2
    assert loss.detach().item() == pytest.approx(float(expected), rel=1e-5)
    loss.backward()  # it trains the router
    assert moe.gate.weight.grad.abs().sum() > 0
