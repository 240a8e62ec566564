"""A MoA attention plan: one span rule (alpha, beta) per attention unit, the file that holds it
(`moa_plan.json` in a model directory), and the one definition of what a rule keeps.

A unit u with rule (alpha, beta), sized for a request of N tokens (prompt + planned new ones), keeps

    C = round_up_B(max(2B, min(N, alpha + beta * N)))       KV slots (a multiple of the block size B)
    S = min(C, B) sink slots (the first tokens),  R = C - S ring slots (the most recent tokens)

and query position i sees key j iff j <= i and (j < S or j > i - R). `kv_slots` and `span_mask` are
that definition; the plan optimiser (costs, densities, the influence it drops), the plan file's
`density_at`, validation and the serving side all use these, so a plan's density is the density served.
This lives in models/ (not compressors/) because serving reads it too.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from leanserve.atomic import atomic_write_text
from leanserve.errors import UserError

FORMAT = "leanserve.moa.plan/v1"
PLAN_FILE = "moa_plan.json"
UNITS = ("kv_head", "q_head")
REQUIRED = ("model", "alphas", "betas", "profile_lengths", "extend_length", "validation_length",
            "density_target", "block_size")


def kv_slots(alpha: float, beta: float, n: int, block_size: int) -> int:
    """KV slots C a unit with rule (alpha, beta) keeps for a request of n tokens (sink included)."""
    span = max(2 * block_size, min(n, alpha + beta * n))
    return math.ceil(span / block_size) * block_size


def kv_slots_tensor(alphas: torch.Tensor, betas: torch.Tensor, n: torch.Tensor, block_size: int) -> torch.Tensor:
    """kv_slots for many units and lengths at once, as int64 (alphas, betas float64 and n
    broadcast). The same float64 operations in the same order as kv_slots, so every answer equals
    kv_slots' exactly; the serving cache sizes pages with it on the host and on the device."""
    n = n.to(torch.float64)
    span = torch.minimum(n, alphas + betas * n).clamp_min(2 * block_size)
    return (torch.ceil(span / block_size) * block_size).long()


def kv_blocks(alpha: float, beta: float, n: int, block_size: int) -> int:
    """The same in blocks (pages of `block_size` tokens)."""
    return kv_slots(alpha, beta, n, block_size) // block_size


def sink_and_ring(slots: int, block_size: int) -> tuple[int, int]:
    """(S, R): sink slots and ring slots of a unit that keeps `slots`."""
    sink = min(slots, block_size)
    return sink, slots - sink


def span_mask(n: int, sink: int, ring: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] bool: query i sees key j (causal, first `sink` keys, last `ring` keys up to i)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < sink) | (j > i - ring))


@dataclass
class MoAPlan:
    model: dict                       # name, num_layers, num_q_heads, num_kv_heads, head_dim
    alphas: list[list[float]]         # [layer][unit], tokens
    betas: list[list[float]]          # [layer][unit]
    profile_lengths: list[int]
    extend_length: int
    validation_length: int
    density_target: float
    block_size: int
    unit: str = "kv_head"
    rule_cap_per_layer: int | None = 2
    density_at: dict[str, float] = field(default_factory=dict)  # str(N) -> mean C_u(N) / N
    objectives: dict[str, float] = field(default_factory=dict)  # str(L) -> normalised influence dropped
    validation_ce: float | None = None
    calibration: dict = field(default_factory=dict)
    format: str = FORMAT

    @property
    def sink_tokens(self) -> int:
        return self.block_size

    @property
    def min_cache_tokens(self) -> int:
        return 2 * self.block_size

    def slots(self, n: int) -> list[list[int]]:
        """C_u(n) of every unit, [layer][unit]."""
        return [[kv_slots(a, b, n, self.block_size) for a, b in zip(la, lb)]
                for la, lb in zip(self.alphas, self.betas)]

    def density(self, n: int) -> float:
        slots = [c for layer in self.slots(n) for c in layer]
        return sum(slots) / (len(slots) * n)

    def lengths(self) -> list[int]:
        """The lengths the plan is constrained at: the profile lengths and the extend length."""
        return sorted({*self.profile_lengths, self.extend_length})

    def to_json(self) -> dict:
        raw = asdict(self)
        raw["sink_tokens"], raw["min_cache_tokens"] = self.sink_tokens, self.min_cache_tokens
        return {"format": raw.pop("format"), **raw}


def save_plan(path: str | Path, plan: MoAPlan) -> Path:
    validate_plan(plan, str(path))
    path = Path(path)
    atomic_write_text(path, json.dumps(plan.to_json(), indent=2) + "\n")
    return path


def load_plan(path: str | Path, hf_config=None) -> MoAPlan:
    """Read and check a plan file; with `hf_config`, also that its shapes are the model's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no MoA plan file")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{path}: not a MoA plan (format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                        f"expected {FORMAT!r})")
    raw = dict(raw)
    derived = {"sink_tokens": raw.pop("sink_tokens", None), "min_cache_tokens": raw.pop("min_cache_tokens", None)}
    known = {f.name for f in fields(MoAPlan)}
    unknown, missing = sorted(set(raw) - known), [k for k in REQUIRED if k not in raw]
    if unknown or missing:
        raise UserError(f"{path}: " + "; ".join(filter(None, [unknown and f"unknown keys {unknown}",
                                                              missing and f"missing keys {missing}"])))
    plan = MoAPlan(**raw)
    validate_plan(plan, str(path))
    if derived["sink_tokens"] not in (None, plan.sink_tokens) or \
            derived["min_cache_tokens"] not in (None, plan.min_cache_tokens):
        raise UserError(f"{path}: sink_tokens must equal block_size ({plan.block_size}) and min_cache_tokens "
                        f"2 * block_size; got {derived['sink_tokens']} and {derived['min_cache_tokens']}")
    if hf_config is not None:
        check_plan_fits(plan, hf_config, str(path))
    return plan


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_plan(plan: MoAPlan, where: str = "MoA plan") -> None:
    """UserError naming the first thing wrong with a plan (shapes, rules, lengths, densities, cap)."""
    def bad(message: str):
        raise UserError(f"{where}: {message}")

    if plan.format != FORMAT:
        bad(f"format must be {FORMAT!r}")
    m = plan.model
    shape_keys = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
    if not isinstance(m, dict) or not all(_int(m.get(k)) and m[k] > 0 for k in shape_keys):
        bad(f"model must give positive integers {', '.join(shape_keys)}")
    if m["num_q_heads"] % m["num_kv_heads"]:
        bad(f"num_q_heads {m['num_q_heads']} is not a multiple of num_kv_heads {m['num_kv_heads']}")
    if plan.unit not in UNITS:
        bad(f"unit must be one of {UNITS}, got {plan.unit!r}")
    B = plan.block_size
    if not _int(B) or B < 16 or B & (B - 1):
        bad(f"block_size must be a power of two >= 16, got {B!r}")
    lengths = plan.profile_lengths
    if not isinstance(lengths, list) or not lengths or not all(_int(n) and n > 0 for n in lengths) \
            or lengths != sorted(set(lengths)):
        bad(f"profile_lengths must be increasing positive integers, got {lengths!r}")
    for name in ("extend_length", "validation_length"):
        if not _int(getattr(plan, name)) or getattr(plan, name) <= 0:
            bad(f"{name} must be a positive integer")
    if plan.extend_length < lengths[-1]:
        bad(f"extend_length {plan.extend_length} is below the longest profile length {lengths[-1]}")
    if not _number(plan.density_target) or not 0 < plan.density_target <= 1:
        bad(f"density_target must be in (0, 1], got {plan.density_target!r}")
    units = m["num_kv_heads"] if plan.unit == "kv_head" else m["num_q_heads"]
    for name, rows in (("alphas", plan.alphas), ("betas", plan.betas)):
        if not isinstance(rows, list) or len(rows) != m["num_layers"] or \
                any(not isinstance(r, list) or len(r) != units or not all(map(_number, r)) for r in rows):
            bad(f"{name} must be {m['num_layers']} lists (layers) of {units} numbers ({plan.unit} units)")
    n_min = lengths[0]
    for layer, (la, lb) in enumerate(zip(plan.alphas, plan.betas)):
        for u, (a, b) in enumerate(zip(la, lb)):
            if not 0 <= b <= 1:
                bad(f"layer {layer} unit {u}: beta {b} is outside [0, 1]")
            if not a + b * n_min > 0:
                bad(f"layer {layer} unit {u}: rule ({a}, {b}) keeps no tokens at the shortest length {n_min}")
    cap = plan.rule_cap_per_layer
    if cap is not None:
        if not _int(cap) or cap < 1:
            bad(f"rule_cap_per_layer must be a positive integer or null, got {cap!r}")
        for layer, (la, lb) in enumerate(zip(plan.alphas, plan.betas)):
            if len(set(zip(la, lb))) > cap:
                bad(f"layer {layer} has {len(set(zip(la, lb)))} distinct rules, more than rule_cap_per_layer {cap}")
    if not isinstance(plan.density_at, dict):
        bad("density_at must map lengths to densities")
    for key, value in plan.density_at.items():
        if not key.isdigit() or not _number(value) or abs(plan.density(int(key)) - value) > 1e-6:
            bad(f"density_at[{key!r}] = {value!r} is not the plan's density at that length "
                f"({plan.density(int(key)) if key.isdigit() else 'not a length'})")


def check_plan_fits(plan: MoAPlan, hf_config, where: str = "MoA plan") -> None:
    """UserError unless the plan's shapes are the model's (layers, heads, KV heads, head size)."""
    num_q = hf_config.num_attention_heads
    actual = {"num_layers": hf_config.num_hidden_layers, "num_q_heads": num_q,
              "num_kv_heads": getattr(hf_config, "num_key_value_heads", None) or num_q,
              "head_dim": getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_q}
    wrong = [f"{k} {plan.model[k]} != {v}" for k, v in actual.items() if plan.model[k] != v]
    if wrong:
        raise UserError(f"{where} does not fit the model: {', '.join(wrong)}")
