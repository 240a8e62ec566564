"""MoE++ routing and layer forward in plain PyTorch: the correctness oracle of the fused Triton
kernel, the training forward (differentiable end to end) and the CPU serving path.

Expert layout (the released MoE++ checkpoints' order, kept for weight compatibility):
FFN experts 0..n_ffn-1, then n_const constant experts, then n_copy copy experts, then n_zero zero
experts (last). Plain MoE is the same layer with no zero-computation (ZC) experts.

Per token (x = the post-norm hidden state):
  logits = x W_r^T (+ prev_logits W_g^T: the gating residual chains layers), fp32
  z = logits / (std(logits) + eps) * norm_std   (Skywork-MoE normalisation; eps: a constant row is not NaN)
  p = softmax(z); (ids, g) = top-k(p); renormalise g (mode below)
  y = sum over FFN slots g * SwiGLU_e(x)  +  s * x  +  sum_c b_c * v_c
where the ZC part is a rank-(1 + n_const) update: copy slots add g to s; constant expert c adds
g * a1 to s and g * a2 to b_c with [a1, a2] = softmax(W_c x); zero slots add nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

RENORM_MODES = ("released", "paper", "mixtral")


@dataclass(frozen=True)
class MoEPPLayout:
    n_ffn: int
    n_const: int = 2
    n_copy: int = 1
    n_zero: int = 1
    top_k: int = 2
    # "released": zero-expert gates dropped, the rest renormalised to sum 1 (the checkpoint's code);
    # "paper": raw softmax gates (the paper's Eq. 1); "mixtral": softmax over the top-k logits
    renorm_mode: str = "released"
    logit_norm_std: float | None = 1.0  # None: no std-normalisation of the router logits
    eps: float = 1e-6

    def __post_init__(self):
        if self.renorm_mode not in RENORM_MODES:
            raise ValueError(f"renorm_mode must be one of {RENORM_MODES}, got {self.renorm_mode!r}")
        if min(self.n_ffn, self.n_const, self.n_copy, self.n_zero) < 0 or self.n_ffn < 1:
            raise ValueError("expert counts must be >= 0 with at least one FFN expert")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in 1..{self.n_experts}, got {self.top_k}")

    @property
    def n_zc(self) -> int:
        return self.n_const + self.n_copy + self.n_zero

    @property
    def n_experts(self) -> int:
        return self.n_ffn + self.n_zc

    @property
    def first_copy(self) -> int:
        return self.n_ffn + self.n_const

    @property
    def first_zero(self) -> int:
        return self.n_ffn + self.n_const + self.n_copy


@dataclass
class Routing:
    logits: torch.Tensor  # [T, N] fp32, residual-augmented: the next layer's prev_logits
    probs: torch.Tensor   # [T, N] fp32 softmax over all experts (the load-balance loss's P)
    ids: torch.Tensor     # [T, k] int64 selected experts
    gates: torch.Tensor   # [T, k] fp32 final slot weights


def route(x: torch.Tensor, router_w: torch.Tensor, layout: MoEPPLayout,
          prev_logits: torch.Tensor | None = None, gate_map: torch.Tensor | None = None) -> Routing:
    """x [T, D]; router_w [N, D]; gate_map [N, N] (with prev_logits [T, N]: the gating residual)."""
    logits = x.float() @ router_w.float().t()
    if prev_logits is not None and gate_map is not None:
        logits = logits + prev_logits.float() @ gate_map.float().t()
    z = logits
    if layout.logit_norm_std is not None:
        z = logits / (logits.std(dim=-1, keepdim=True) + layout.eps) * layout.logit_norm_std
    probs = z.softmax(dim=-1)
    if layout.renorm_mode == "mixtral":
        top_z, ids = z.topk(layout.top_k, dim=-1)
        gates = top_z.softmax(dim=-1)
    else:
        gates, ids = probs.topk(layout.top_k, dim=-1)
        if layout.renorm_mode == "released":
            gates = gates.masked_fill(ids >= layout.first_zero, 0.0)
            total = gates.sum(dim=-1, keepdim=True)
            # every slot on a zero expert: the layer outputs 0 (no 0/0)
            gates = torch.where(total > 0, gates / total.clamp_min(torch.finfo(gates.dtype).tiny), gates)
    return Routing(logits, probs, ids, gates)


def zc_coefficients(x: torch.Tensor, routing: Routing, const_gate: torch.Tensor | None,
                    layout: MoEPPLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """-> s [T] and b [T, n_const] (fp32) of the ZC update s * x + b @ const_v.
    const_gate [2 * n_const, D]: rows 2c, 2c+1 are W_c of constant expert c."""
    ids, gates = routing.ids, routing.gates
    is_copy = (ids >= layout.first_copy) & (ids < layout.first_zero)
    s = (gates * is_copy).sum(dim=-1)
    b = x.new_zeros(x.shape[0], layout.n_const, dtype=torch.float32)
    if layout.n_const:
        a = (x.float() @ const_gate.float().t()).view(-1, layout.n_const, 2).softmax(dim=-1)  # [T, C, 2]
        onehot = F.one_hot((ids - layout.n_ffn).clamp(0, layout.n_const - 1), layout.n_const).float()
        onehot = onehot * ((ids >= layout.n_ffn) & (ids < layout.first_copy))[..., None]
        g_const = (gates[..., None] * onehot).sum(dim=1)  # [T, C] gate of each constant expert
        s = s + (g_const * a[..., 0]).sum(dim=-1)
        b = g_const * a[..., 1]
    return s, b


def moepp_forward_reference(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor,
                            const_gate: torch.Tensor | None, const_v: torch.Tensor | None,
                            layout: MoEPPLayout) -> torch.Tensor:
    """y [T, D] in x's dtype. w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]. A loop over the
    FFN experts that received tokens (index_select / index_add): differentiable, and the oracle."""
    num_tokens, k = routing.ids.shape
    flat_ids, flat_gates = routing.ids.reshape(-1), routing.gates.reshape(-1)
    y = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(flat_ids[flat_ids < layout.n_ffn]).tolist():
        slots = (flat_ids == e).nonzero().squeeze(1)
        rows = slots // k
        h = x.index_select(0, rows) @ w13[e].t()
        gate, up = h.chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w2[e].t()
        y = y.index_add(0, rows, out.float() * flat_gates[slots, None])
    s, b = zc_coefficients(x, routing, const_gate, layout)
    y = y + s[:, None] * x.float()
    if layout.n_const:
        y = y + b @ const_v.float()
    return y.to(x.dtype)


def force_routing(routing: Routing, ids: torch.Tensor, layout: MoEPPLayout) -> Routing:
    """`routing` with `ids` [T, k] in place of its top-k (benchmarks' and tests' forced routing; the
    fused kernel's `forced_ids`): gates from the same probabilities and renorm_mode (mixtral's softmax
    over the k selected logits equals p / sum of the selected p)."""
    gates = routing.probs.gather(1, ids)
    if layout.renorm_mode == "released":
        gates = gates.masked_fill(ids >= layout.first_zero, 0.0)
        total = gates.sum(dim=-1, keepdim=True)
        gates = torch.where(total > 0, gates / total.clamp_min(torch.finfo(gates.dtype).tiny), gates)
    elif layout.renorm_mode == "mixtral":
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(routing.logits, routing.probs, ids, gates)
