"""Ensemble directories over the tiny Llama (models/ensemble_dir.py format) and the naive reference the
served ensemble must match: one transformers model per member, log-mean-exp of their log_softmax."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from leanserve.models.ensemble_dir import member_param_names, read_members, write_members
from leanserve.models.model_dir import ModelInfo, load_model_info, save_model_info


def build_ensemble_dir(base_dir: Path, out_dir: Path, *, num_members: int, scope: str = "full", noise: float = 0.1,
                       seed: int = 0, mode: str | None = None) -> Path:
    """base_dir + members = the base's parameters plus N(0, noise^2) each (noise 0: S copies of the base)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(base_dir, out_dir)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    state = hf.state_dict()  # a tied model lists lm_head.weight here too
    names = member_param_names([n for n, _ in hf.named_parameters()], scope, hf.config.num_hidden_layers,
                               hf.config.tie_word_embeddings)
    gen = torch.Generator().manual_seed(seed)
    members = [{n: state[n] + noise * torch.randn(state[n].shape, generator=gen) for n in names}
               for _ in range(num_members)]
    write_members(out_dir, members, torch.float32)
    settings = {"num_members": num_members, "scope": scope, "member_params": names}
    if mode is not None:
        settings["ensemble_mode"] = mode
    save_model_info(out_dir, ModelInfo(kind="llm", method="ensemble", settings=settings))
    return out_dir


def member_models(ens_dir: Path) -> list:
    """One transformers model per member: the base directory with the member's parameters loaded
    (a tied model's head untied first: members have heads of their own)."""
    from transformers import AutoModelForCausalLM

    models = []
    for member in read_members(ens_dir, load_model_info(ens_dir).settings):
        model = AutoModelForCausalLM.from_pretrained(ens_dir, dtype=torch.float32).eval()
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        missing, unexpected = model.load_state_dict(member, strict=False)
        assert not unexpected, unexpected
        models.append(model)
    return models


@torch.no_grad()
def mixture_logprobs(models: list, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab]: log p̄ of the next token after each prefix, members in a plain loop."""
    ids = torch.tensor([token_ids])
    member = torch.stack([m(ids).logits[0].float().log_softmax(-1) for m in models])
    return member.logsumexp(0) - math.log(len(models))


@torch.no_grad()
def greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None)
    return out[0, len(prompt):].tolist()
