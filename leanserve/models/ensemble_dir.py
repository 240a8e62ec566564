"""The ensemble directory: S posterior samples of an LM stored beside one ordinary model.

    DIR/config.json, tokenizer files, model.safetensors   the base (MAP) model: a plain transformers
                                                           directory that loads anywhere as one model
    DIR/members.safetensors                               "{s}.{name}" for member s and every name in
                                                           settings["member_params"] (HF parameter names)
    DIR/leanserve.json                                    method "ensemble"; settings below

Only the parameters the sampler moved are stored per member (`scope`): "full" stores every
parameter, "last:K" the last K decoder blocks, the final norm and the LM head, so that S members
of a small-scope ensemble cost S x (those blocks + head) on disk and in memory, and the trunk runs
once for all members. A tied-embedding model with scope "last:K" stores `lm_head.weight` per member:
its members have their own heads while the shared trunk keeps the tied input embedding.

settings = {"num_members": S, "scope": "full" | "last:K", "member_params": [names],
            "ensemble_mode": "token_mean" | "sequence_sample"}
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leanserve.atomic import atomic_write
from leanserve.errors import UserError

METHOD = "ensemble"
MEMBERS_FILE = "members.safetensors"
MODES = ("token_mean", "sequence_sample")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def parse_scope(scope: str, num_layers: int) -> int:
    """-> index of the first decoder block whose parameters are sampled (0 for "full")."""
    if scope == "full":
        return 0
    m = re.fullmatch(r"last:(\d+)", scope)
    if m is None or not 0 <= int(m.group(1)) <= num_layers:
        raise UserError(f"scope must be 'full' or 'last:K' with 0 <= K <= {num_layers}, got {scope!r}")
    return num_layers - int(m.group(1))


def member_param_names(all_names: list[str], scope: str, num_layers: int, tied: bool) -> list[str]:
    """HF parameter names a member stores under `scope` (all_names: the HF model's named_parameters)."""
    first = parse_scope(scope, num_layers)
    if first == 0:
        names = list(all_names)
    else:
        names = [n for n in all_names
                 if (m := _LAYER.match(n)) and int(m.group(1)) >= first or n in ("model.norm.weight", "lm_head.weight")]
    if tied and "lm_head.weight" not in names:
        names.append("lm_head.weight")  # the tied head as a per-member parameter of its own
    return names


def write_members(model_dir: str | Path, members: list[dict[str, torch.Tensor]], dtype: torch.dtype) -> Path:
    """members[s][name] -> DIR/members.safetensors in `dtype`, written atomically."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    names = list(members[0])
    flat = {}
    for s, member in enumerate(members):
        if list(member) != names:
            raise ValueError(f"member {s} stores other parameters than member 0")
        flat.update({f"{s}.{n}": t.detach().to("cpu", dtype).contiguous() for n, t in member.items()})
    path = Path(model_dir) / MEMBERS_FILE
    with atomic_write(path) as tmp:
        save_file(flat, str(tmp))
    return path


def read_members(model_dir: str | Path, settings: dict, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """DIR/members.safetensors -> [member][name] tensors, checked against `settings`."""
    check_settings(settings)
    path = Path(model_dir) / MEMBERS_FILE
    if not path.is_file():
        raise UserError(f"{model_dir}: leanserve.json names method 'ensemble' but {MEMBERS_FILE} is missing")
    num, names = settings["num_members"], settings["member_params"]
    members: list[dict[str, torch.Tensor]] = [{} for _ in range(num)]
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        expected = {f"{s}.{n}" for s in range(num) for n in names}
        if keys != expected:
            missing, extra = sorted(expected - keys)[:3], sorted(keys - expected)[:3]
            raise UserError(f"{path} does not match leanserve.json's members (missing {missing}, unexpected {extra})")
        for s in range(num):
            for n in names:
                t = f.get_tensor(f"{s}.{n}")
                members[s][n] = t if dtype is None else t.to(dtype)
    return members


def check_settings(settings: dict) -> None:
    for key in ("num_members", "scope", "member_params"):
        if key not in settings:
            raise UserError(f"ensemble settings lack {key!r}")
    if not isinstance(settings["num_members"], int) or settings["num_members"] < 1:
        raise UserError(f"ensemble num_members must be an integer >= 1, got {settings['num_members']!r}")
    mode = settings.get("ensemble_mode", "token_mean")
    if mode not in MODES:
        raise UserError(f"ensemble_mode must be one of {', '.join(MODES)}, got {mode!r}")
