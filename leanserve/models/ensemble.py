"""Serve an ensemble directory (models/ensemble_dir.py: a base model + S member weight sets) as ONE model.

The "ensemble" method's convert step (models/methods.py): the loader builds and loads the dense base
model, `convert` stacks the members' weights along a leading S axis and returns an `EnsembleLM` in the
mode of settings["ensemble_mode"] (`leanserve serve --model-setting ensemble_mode=...` overrides it).

token_mean (default): every step runs all S members on the same tokens, and the logits the model hands
the sampler are the mixture's log-probabilities log p̄ = logsumexp_s log_softmax(z_s) − log S. The
unchanged sampler then greedies / samples from p̄, and its raw logprobs are mixture logprobs
(log_softmax(log p̄) = log p̄). Logits and member logprobs are never averaged.
- The blocks before the first sampled block (scope "last:K") run once for all members (shared trunk);
  from the first sampled block on, members are folded into the batch: hidden states [S, T, D], each
  linear one batched matmul over its stacked weights [S, out, in] (one launch for all members).
- Attention folds the members into the head axis: q heads S·H, KV heads S·Hkv, member-major, so the
  dense paged kernels and PyTorch paths run unchanged; a member's GQA groups lie inside its own heads,
  so it attends to its own K/V only. All members' caches share the blocks of one block table per
  request (LayerGroupsKVSpec: Hkv heads in trunk layers, S·Hkv in member layers).
- Cost per token: S x the FLOPs, weight reads and KV of the member layers and the head; the trunk once.
  No data-dependent shapes, so decode is captured in CUDA graphs like a dense model.

sequence_sample: each completion (each choice of an n > 1 request) runs ONE member s ~ Uniform(S),
which samples exactly from the sequence-level mixture (1/S) Σ_s P_s(x). The model declares
`num_variants = S`; the engine draws `seq.variant` when it creates a sequence (from the request's seeded
generator, else its own), keys the sequence's prefix-cache blocks by it (requests on different members
never share K/V) and hands the model per-token variant ids in AttentionMetadata.variants. KV is 1x (a
dense spec), compute 1x per token. Member layers route each token through its member's weights:
- eager steps group tokens by member from the host copy of the ids (no device sync): one GEMM per
  member present, and a step whose tokens all ride one member (batch 1, a lone prefill) is one plain
  GEMM that reads that member's weights only;
- captured decode graphs cannot have data-dependent shapes, so every member's GEMM runs on every row
  (one batched matmul) and each row keeps its own member's output: S x the FLOPs, which decode has to
  spare, but also every member's weights read every step, which is what decode pays for. At batch 1 a
  replayed step reads S x the bytes of the member it needs (once a batch holds every member, grouping
  reads them all too). A grouped-GEMM kernel reading only the members present (as MoE kernels do)
  would remove that.

Memory: S x the member-scope weights (the base's copies of them are released while stacking). Members
are read with read_members onto the host, then copied into the stacks on the model's device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.errors import UserError
from leanserve.models.attention.kv_spec import KVCache, LayerGroupsKVSpec, PagedKVSpec
from leanserve.models.attention.metadata import AttentionMetadata
from leanserve.models.attention.paged import PagedAttention
from leanserve.models.ensemble_dir import MEMBERS_FILE, check_settings, parse_scope, read_members
from leanserve.models.layers import MergedLinear, RotaryEmbedding, rms_norm
from leanserve.models.loader import RANDOM_STD, packed_target
from leanserve.models.tensor_parallel import tp

TOKEN_MEAN, SEQUENCE_SAMPLE = "token_mean", "sequence_sample"


@dataclass(frozen=True)
class Route:
    """sequence_sample: the member each of a step's T tokens runs through, and how member layers
    compute it: grouped by member (`order`, `counts`, eager), every member on every row then select
    (`order` None: CUDA graphs), or one member for all (`single`)."""
    variants: torch.Tensor            # [T] int64
    order: torch.Tensor | None = None  # token indices sorted by member
    counts: tuple[int, ...] = ()       # tokens per member, in `order`
    single: int | None = None          # the one member every token rides

    @classmethod
    def grouped(cls, host: list[int], num_members: int, variants: torch.Tensor | None, device: torch.device) -> Route:
        """From the host copy of the ids: no device sync, and `order` travels with one copy."""
        counts = [0] * num_members
        for v in host:
            counts[v] += 1
        if variants is None:
            variants = _to_device(host, device)
        if max(counts) == len(host):
            return cls(variants, single=host[0])
        order = _to_device(sorted(range(len(host)), key=host.__getitem__), device)
        return cls(variants, order, tuple(counts))

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out], row t through weight[variants[t]] [out, in]."""
        if self.single is not None:
            return F.linear(x, weight[self.single], None if bias is None else bias[self.single])
        if self.order is None:  # capturable: all members on all rows ([S, T, out]), then each row's own
            y = torch.matmul(x, weight.mT)
            if bias is not None:
                y = y + bias[:, None]
            return torch.take_along_dim(y, self.variants[None, :, None], dim=0)[0]
        xs = x.index_select(0, self.order).split(self.counts)
        y = torch.cat([F.linear(xs[s], weight[s], None if bias is None else bias[s])
                       for s, n in enumerate(self.counts) if n])
        return torch.empty_like(y).index_copy_(0, self.order, y)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [S, ...] -> each row's member's [T, ...] (or the single member's [...], broadcast)."""
        return weight[self.single] if self.single is not None else weight[self.variants]


def _to_device(data: list[int], device: torch.device) -> torch.Tensor:
    pin = device.type == "cuda"  # pinned + non-blocking: a pageable copy waits for the GPU's queue
    return torch.tensor(data, dtype=torch.int64, pin_memory=pin).to(device, non_blocking=pin)


class StackedLinear(nn.Module):
    """S linears of one shape: weight [S, out, in], bias [S, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        """route None (token_mean): x [S, T, in] -> [S, T, out], one batched matmul; else x [T, in] -> [T, out]."""
        if route is not None:
            return route.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.bmm(x, self.weight.mT)
        return torch.baddbmm(self.bias[:, None], x, self.weight.mT)


class StackedRMSNorm(nn.Module):
    """S RMSNorm weights [S, D], with the fused residual add of layers.RMSNorm."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, route: Route | None, residual: torch.Tensor | None = None):
        # token_mean: [S, 1, D] broadcasts a shared trunk's [T, D] stream out to [S, T, D]
        weight = self.weight[:, None] if route is None else route.rows(self.weight)
        if residual is None:
            return rms_norm(x, weight, self.eps)
        x = x + residual
        return rms_norm(x, weight, self.eps), x


class StackedEmbedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [S, vocab, D]

    def forward(self, input_ids: torch.Tensor, route: Route | None) -> torch.Tensor:
        if route is None:
            return self.weight[:, input_ids]  # [S, T, D]
        if route.single is not None:
            return F.embedding(input_ids, self.weight[route.single])
        return self.weight[route.variants, input_ids]


class MemberDecoderLayer(nn.Module):
    """LlamaDecoderLayer with S weight sets. token_mean: hidden [S, T, D], attention over S x the heads
    (member-major); sequence_sample: hidden [T, D], each token through its member (Route)."""

    def __init__(self, base: nn.Module, stacks: dict[str, torch.Tensor], num_members: int, fold_heads: bool):
        super().__init__()
        attn = base.self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.q_size, self.kv_size = attn.q_size, attn.kv_size

        def linear(prefix: str) -> StackedLinear:
            return StackedLinear(stacks.pop(f"{prefix}.weight"), stacks.pop(f"{prefix}.bias", None))

        self.qkv_proj, self.o_proj = linear("self_attn.qkv_proj"), linear("self_attn.o_proj")
        self.gate_up_proj, self.down_proj = linear("mlp.gate_up_proj"), linear("mlp.down_proj")
        self.act_fn = base.mlp.act_fn
        self.input_layernorm = StackedRMSNorm(stacks.pop("input_layernorm.weight"), base.input_layernorm.eps)
        self.post_attention_layernorm = StackedRMSNorm(stacks.pop("post_attention_layernorm.weight"),
                                                       base.post_attention_layernorm.eps)
        if stacks:
            raise ValueError(f"the decoder layer has parameters the ensemble does not stack: {sorted(stacks)}")
        fold = num_members if fold_heads else 1
        p = attn.attn
        self.attn = PagedAttention(p.num_heads * fold, p.num_kv_heads * fold, p.head_dim, p.scale, p.sliding_window)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                rotary_emb: RotaryEmbedding, kv_cache: KVCache, meta: AttentionMetadata, route: Route | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden, route), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, route, residual)
        q, k, v = self.qkv_proj(hidden, route).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = positions.shape[0]
        if route is None:  # [S, T, heads * D] -> [T, S * heads, D]: member s owns heads s*H .. s*H + H-1
            q, k, v = (t.transpose(0, 1).reshape(num_tokens, -1, self.head_dim) for t in (q, k, v))
        else:
            q, k, v = (t.reshape(num_tokens, -1, self.head_dim) for t in (q, k, v))
        q, k = rotary_emb(positions, q, k)
        o = self.attn(q, k, v, kv_cache, meta)  # [T, S * H * D] (token_mean) or [T, H * D]
        if route is None:
            o = o.view(num_tokens, -1, self.q_size).transpose(0, 1)
        hidden, residual = self.post_attention_layernorm(self.o_proj(o, route), route, residual)
        return self.down_proj(self.act_fn(self.gate_up_proj(hidden, route)), route), residual


class EnsembleLM(nn.Module):
    """S members of one Llama-family model behind the engine's model interface (forward, compute_logits,
    kv_cache_spec); the module docstring says how each mode computes and what it costs."""

    def __init__(self, base: nn.Module, stacks: dict[str, torch.Tensor], num_members: int, first: int, mode: str):
        super().__init__()
        self.config = base.config
        self.mode, self.num_members, self.first = mode, num_members, first
        core = base.model
        self.embed_tokens = core.embed_tokens if first else StackedEmbedding(stacks.pop("model.embed_tokens.weight"))
        self.trunk = nn.ModuleList(core.layers[:first])
        self.members = nn.ModuleList()
        for i in range(first, base.num_layers):
            prefix = f"model.layers.{i}."
            layer_stacks = {n.removeprefix(prefix): stacks.pop(n) for n in list(stacks) if n.startswith(prefix)}
            self.members.append(MemberDecoderLayer(core.layers[i], layer_stacks, num_members, mode == TOKEN_MEAN))
        self.norm = StackedRMSNorm(stacks.pop("model.norm.weight"), core.norm.eps)
        self.lm_head = StackedLinear(stacks.pop("lm_head.weight"), None)
        self.rotary_emb = core.rotary_emb
        self.num_layers, self.num_kv_heads, self.head_dim = base.num_layers, base.num_kv_heads, base.head_dim
        self.vocab_size = base.vocab_size
        if mode == SEQUENCE_SAMPLE:
            self.num_variants = num_members  # the engine's variant seam: one member per sequence

    def _route(self, meta: AttentionMetadata) -> Route | None:
        if self.mode == TOKEN_MEAN:
            return None
        if meta.variants is None:
            raise ValueError("sequence_sample needs the step's per-token variant ids (AttentionMetadata.variants)")
        if meta.variants_cpu is None:
            return Route(meta.variants)
        return Route.grouped(meta.variants_cpu, self.num_members, meta.variants, meta.variants.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                attn_meta: AttentionMetadata) -> torch.Tensor:
        """Flattened step tokens [T] -> final-normed hidden states: token_mean [T, S, D] (every member's
        state of each token, so rows are still tokens), sequence_sample [T, D]."""
        route = self._route(attn_meta)
        hidden = self.embed_tokens(input_ids) if self.first else self.embed_tokens(input_ids, route)
        residual = None
        for layer, kv_cache in zip(self.trunk, kv_caches[:self.first], strict=True):
            hidden, residual = layer(positions, hidden, residual, self.rotary_emb, kv_cache, attn_meta)
        for layer, kv_cache in zip(self.members, kv_caches[self.first:], strict=True):
            hidden, residual = layer(positions, hidden, residual, self.rotary_emb, kv_cache, attn_meta, route)
        hidden, _ = self.norm(hidden, route, residual)
        return hidden.transpose(0, 1) if route is None else hidden

    def compute_logits(self, hidden: torch.Tensor, variants: list[int] | None = None) -> torch.Tensor:
        """token_mean: hidden [N, S, D] -> the mixture's log-probabilities [N, vocab];
        sequence_sample: hidden [N, D] and each row's member (host ids) -> that member's logits."""
        if self.mode == TOKEN_MEAN:
            logprobs = self.lm_head(hidden.transpose(0, 1), None).float().log_softmax(-1)  # [S, N, vocab]
            return logprobs.logsumexp(0) - math.log(self.num_members)
        if variants is None:
            raise ValueError("sequence_sample needs each row's variant id to pick its member's head")
        route = Route.grouped(variants, self.num_members, None, hidden.device)
        return self.lm_head(hidden, route).float()

    def kv_cache_spec(self, block_size: int, dtype: torch.dtype) -> PagedKVSpec | LayerGroupsKVSpec:
        """sequence_sample: the dense cache (one member per sequence). token_mean: trunk layers keep Hkv
        heads, member layers S x Hkv (every member's K/V of a token in the same slot)."""
        def spec(num_layers: int, heads: int) -> PagedKVSpec:
            return PagedKVSpec(num_layers, block_size, heads, self.head_dim, dtype)
        if self.mode == SEQUENCE_SAMPLE:
            return spec(self.num_layers, self.num_kv_heads)
        groups = [spec(self.first, self.num_kv_heads), spec(self.num_layers - self.first,
                                                             self.num_members * self.num_kv_heads)]
        return LayerGroupsKVSpec(tuple(g for g in groups if g.num_layers))


def member_targets(model: nn.Module, first: int) -> dict[str, nn.Parameter]:
    """Our parameter name -> the base's parameter, for every parameter each member has its own of:
    blocks first.., the final norm, the head, and with a full scope the input embedding. A tied
    model's head is its own target: members have their own heads even where the trunk keeps the tie."""
    targets = {f"model.layers.{i}.{n}": p for i in range(first, model.num_layers)
               for n, p in model.model.layers[i].named_parameters()}
    targets["model.norm.weight"] = model.model.norm.weight
    targets["lm_head.weight"] = model.lm_head.weight
    if first == 0:
        targets["model.embed_tokens.weight"] = model.model.embed_tokens.weight
    return targets


def _shard_shapes(model: nn.Module, target: str, param: torch.Tensor) -> dict[int | None, tuple[int, ...]]:
    """shard -> the checkpoint tensor shape it takes (None: the whole, unfused parameter)."""
    module = model.get_submodule(target.rpartition(".")[0])
    if not isinstance(module, MergedLinear):
        return {None: tuple(param.shape)}
    return {i: (size, *param.shape[1:]) for i, size in enumerate(module.output_sizes)}


def _plan(model: nn.Module, targets: dict[str, nn.Parameter], settings: dict) -> dict[str, list[tuple[str, int | None]]]:
    """target -> the (member parameter name, shard) that fill it; UserError unless the members cover
    exactly the scope's parameters."""
    plan: dict[str, list[tuple[str, int | None]]] = {t: [] for t in targets}
    for name in settings["member_params"]:
        target, shard = packed_target(name, model.packed_modules_mapping)
        if target not in targets:
            raise UserError(f"member parameter {name!r} is not one scope {settings['scope']!r} samples "
                            f"(leanserve.json member_params and scope disagree)")
        plan[target].append((name, shard))
    for target, param in targets.items():
        missing = set(_shard_shapes(model, target, param)) - {shard for _, shard in plan[target]}
        if missing:
            raise UserError(f"leanserve.json member_params lack {target}"
                            + (f" (shards {sorted(missing)})" if None not in missing else "")
                            + f", which scope {settings['scope']!r} samples")
    return plan


@torch.no_grad()
def convert(model: nn.Module, hf_config, settings: dict, *, model_dir, random_weights: bool = False) -> EnsembleLM:
    """The loaded base model + DIR/members.safetensors -> EnsembleLM (random members when random_weights)."""
    if tp().size > 1:  # the member stacks and the mixture head are not written for sharded weights
        raise UserError("ensemble models cannot be served with --tensor-parallel-size > 1")
    check_settings(settings)
    num_members, mode = settings["num_members"], settings.get("ensemble_mode", TOKEN_MEAN)
    first = parse_scope(settings["scope"], model.num_layers)
    targets = member_targets(model, first)
    plan = _plan(model, targets, settings)
    members = None if random_weights else read_members(model_dir, settings)
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(1)
    stacks = {}
    for target, param in targets.items():
        stack = torch.empty((num_members, *param.shape), dtype=param.dtype, device=param.device)
        if members is None:
            _fill_random(stack, target, gen)
        else:
            shapes = _shard_shapes(model, target, param)
            for s, member in enumerate(members):
                for name, shard in plan[target]:
                    tensor = member.pop(name)  # the host copy is freed as it lands
                    if tuple(tensor.shape) != shapes[shard]:
                        raise UserError(f"{model_dir}/{MEMBERS_FILE}: {s}.{name} has shape {tuple(tensor.shape)}, "
                                        f"the model needs {shapes[shard]}")
                    dst = stack[s]
                    if shard is not None:
                        dst = dst.narrow(0, sum(shapes[i][0] for i in range(shard)), shapes[shard][0])
                    dst.copy_(tensor)
        stacks[target] = stack
        if target.startswith("model.layers."):
            param.data = param.data.new_empty(0)  # the base's copy: drop it now, not after the last layer
    return EnsembleLM(model, stacks, num_members, first, mode).eval()


def _fill_random(stack: torch.Tensor, target: str, gen: torch.Generator) -> None:
    if target.endswith("norm.weight"):
        stack.fill_(1.0)
    elif target.endswith(".bias"):
        stack.zero_()
    else:
        stack.normal_(0.0, RANDOM_STD, generator=gen)
