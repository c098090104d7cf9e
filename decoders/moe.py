"""Mixture of experts: a router choosing top-k experts per token, routed SwiGLU experts plus shared ones, and the
load-balancing tools of DeepSeek-V3 (the auxiliary-loss-free bias update and the sequence-wise balance loss).

    Mixtral      softmax over experts, top-2, weights renormalised over the two
    DeepSeek-V2  softmax, top-k (greedy) or top-k within the `topk_group` groups with the largest max score
    DeepSeek-V3  sigmoid; a learned-free bias shifts only which experts are chosen; groups ranked by the sum of
                 their two best biased scores; weights = unbiased scores of the chosen, normalised, x scale

Dispatch sorts the (token, slot) pairs by expert, so each active expert runs once over a contiguous run of rows
(`torch._grouped_mm` does all runs in one call where torch has it; else a loop over the active experts). At
batch-1 decode only the k chosen experts' weights are read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused (the Llama MLP's layout)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Router(nn.Module):
    """Expert choice per token: x [N, D] -> (weights [N, k] float32, experts [N, k], scores [N, E] float32).

    scoring "softmax" (Mixtral, V2) or "sigmoid" (V3). With n_group > 1, experts come in n_group equal groups and
    only the topk_group best groups are eligible (group score "top2": sum of the two best scores, V3; "max": V2).
    `e_score_correction_bias` (V3, a buffer: balancing changes it, gradients never do) is added for the choice
    only. The weights are the chosen scores, normalised to sum 1 with `norm_topk_prob`, times `scaling`.
    The scores are computed in float32 from the router weight's dtype (DeepSeek keeps it in float32)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, scoring: str = "softmax", n_group: int = 1,
                 topk_group: int = 1, group_score: str = "top2", norm_topk_prob: bool = True, scaling: float = 1.0,
                 correction_bias: bool = False):
        super().__init__()
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
        if group_score not in ("top2", "max"):
            raise ValueError(f"router group_score must be 'top2' or 'max', got {group_score!r}")
        if n_experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"{n_experts} experts cannot form {n_group} groups with {topk_group} kept")
        if not 1 <= top_k <= n_experts * topk_group // n_group:
            kept = n_experts * topk_group // n_group
            raise ValueError(f"top_k={top_k} must lie in [1, experts in the kept groups = {kept}]")
        self.n_experts, self.top_k, self.scoring = n_experts, top_k, scoring
        self.n_group, self.topk_group, self.group_score = n_group, topk_group, group_score
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts) if correction_bias else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x.to(self.weight.dtype), self.weight).float()  # [N, E]
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # [N, G, E/G]
            top2 = self.group_score == "top2"
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1) if top2 else grouped.amax(dim=-1)  # [N, G]
            kept = torch.zeros_like(group_scores, dtype=torch.bool)
            kept.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~kept.repeat_interleave(self.n_experts // self.n_group, dim=1), float("-inf"))
        experts = choice.topk(self.top_k, dim=-1).indices  # [N, k]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, experts, scores


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows x [M, in] sorted by expert, counts [E] rows each -> x_rows @ w[e].T [M, out]; w [E, out, in].

    grouped: one `torch._grouped_mm` call (static shapes: compiles, no host sync); else one product per expert
    that has rows (the counts are read on the host)."""
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's run
        return torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start:start + n] = F.linear(x[start:start + n], w[e])
            start += n
    return out


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether this torch runs `torch._grouped_mm` for x's device and dtype (CPU: all floats; CUDA: bfloat16)."""
    on_device = x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16)
    return hasattr(torch, "_grouped_mm") and on_device


class Experts(nn.Module):
    """E routed SwiGLU experts stored as stacked matrices: gate_up_proj [E, 2I, D], down_proj [E, D, I]."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.use_grouped_mm = True  # False: the per-expert loop (the reference the tests compare against)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], weights/experts [N, k] -> (sum over k of weight x expert(x) [N, D], tokens per expert [E])."""
        N, k = experts.shape
        E = self.gate_up_proj.shape[0]
        flat = experts.reshape(-1)  # [N*k]
        order = flat.argsort(stable=True)  # the (token, slot) pairs, grouped by expert
        counts = torch.zeros(E, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        if torch.compiler.is_compiling():  # the compiled decode step: few pairs, static shapes, no host sync
            return self.gathered(x, weights, flat), counts
        rows = order // k  # [N*k] token of each sorted pair
        grouped = self.use_grouped_mm and grouped_mm_supported(x)
        gate, up = grouped_linear(x[rows], self.gate_up_proj, counts, grouped).chunk(2, dim=-1)
        y = grouped_linear(F.silu(gate) * up, self.down_proj, counts, grouped)  # [N*k, D]
        y = (y * weights.reshape(-1)[order, None]).to(x.dtype)  # weighted in float32, as the references do
        return torch.zeros_like(x).index_add_(0, rows, y), counts

    def gathered(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """The same sum with each (token, slot) pair's expert matrices gathered: reads only the chosen experts, but
        once per pair, so it suits a few tokens (a decode step), where it traces into one static graph."""
        N, k = weights.shape
        xr = x.repeat_interleave(k, dim=0)[:, :, None]  # [N*k, D, 1]
        gate, up = torch.bmm(self.gate_up_proj[flat], xr)[..., 0].chunk(2, dim=-1)  # [N*k, I] each
        y = torch.bmm(self.down_proj[flat], (F.silu(gate) * up)[:, :, None])[..., 0]  # [N*k, D]
        return (y * weights.reshape(-1, 1)).to(x.dtype).view(N, k, -1).sum(dim=1)


class MoE(nn.Module):
    """Routed experts plus (DeepSeek) always-on shared experts: x [B, T, D] -> [B, T, D].

    While training it keeps what balancing needs: `tokens_per_expert` [E] summed since the last `update_bias`, and
    the last forward's scores and choices for `sequence_balance_loss`."""

    def __init__(self, dim: int, expert_hidden: int, n_experts: int, n_shared: int, router: Router):
        super().__init__()
        self.gate = router
        self.experts = Experts(n_experts, dim, expert_hidden)
        self.shared_experts = SwiGLU(dim, expert_hidden * n_shared) if n_shared else None
        self.register_buffer("tokens_per_expert", torch.zeros(n_experts, device="cpu"), persistent=False)  # not meta
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # scores [B, T, E], experts [B, T, k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        weights, experts, scores = self.gate(flat)
        y, counts = self.experts(flat, weights, experts)
        if self.training:
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
            self.last_routing = (scores.view(B, T, -1), experts.view(B, T, -1))
        y = y.view(B, T, D)
        return y if self.shared_experts is None else y + self.shared_experts(x)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE block of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_bias(model: nn.Module, gamma: float = 1e-3) -> list[torch.Tensor]:
    """DeepSeek-V3's auxiliary-loss-free balancing, after an optimizer step: per MoE layer, bias_i -= gamma *
    sign(load_i - mean load) over the tokens routed since the last call; the counts are then reset.
    Returns each layer's load [E] that was used."""
    loads = []
    for moe in moe_layers(model):
        bias = moe.gate.e_score_correction_bias
        if bias is None:
            raise ValueError("update_bias needs routers with e_score_correction_bias (DeepSeek-V3 routing)")
        load = moe.tokens_per_expert.clone()
        bias -= gamma * torch.sign(load - load.mean()).to(bias.dtype)
        moe.tokens_per_expert.zero_()
        loads.append(load)
    return loads


def load_imbalance(load: torch.Tensor) -> float:
    """max / mean of the tokens per expert: 1 is perfect balance, E / k means every token picks the same experts."""
    return float(load.max() / load.float().mean().clamp(min=1e-9))


def sequence_balance_loss(model: nn.Module, alpha: float = 1e-4) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss of the last forward, summed over MoE layers, mean over sequences:
    alpha * sum_i f_i P_i with f_i = E / (k T) x (tokens of the sequence choosing expert i) and P_i the mean over
    the sequence of expert i's score normalised over experts."""
    total = None
    for moe in moe_layers(model):
        if moe.last_routing is None:
            raise ValueError("sequence_balance_loss needs a forward pass in training mode first")
        scores, experts = moe.last_routing  # [B, T, E], [B, T, k]
        B, T, E = scores.shape
        k = experts.shape[-1]
        chosen = torch.zeros_like(scores).scatter_(-1, experts, 1.0).sum(dim=1)  # [B, E] tokens choosing i
        f = chosen * E / (k * T)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
        loss = alpha * (f * p).sum(dim=-1).mean()
        total = loss if total is None else total + loss
    if total is None:
        raise ValueError("the model has no MoE layers")
    return total
