"""Data groups and the mixture sampler of `train lm --groups ... --mixture ...`.

A group is a named slice of a `leanserve data build`: a whole domain (`code`) or the rows of some
task kinds of the `tasks` domain (`arith=tasks:add+sub`). Groups are cut from the build rather than
read from arbitrary files so that every group keeps the build's train/val/test split by document
(what a mixing method tunes on never leaks into what it is scored on) and the manifest's hash still
names the data a model saw.

`MixtureSampler` draws a batch's rows from per-group packed token streams with per-group row counts
set by a mixture p on the simplex; `set_mixture` swaps p between steps at no cost (Aioli changes it
every few steps).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from leanserve.data.lm_data import read_split
from leanserve.data.tasks import KINDS
from leanserve.errors import UserError

TASKS_DOMAIN = "tasks"  # the one domain whose rows carry a task `kind`
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Group:
    name: str
    domain: str
    kinds: tuple[str, ...] = ()  # task kinds of the `tasks` domain; empty: every row of the domain

    @property
    def source(self) -> str:
        return f"{self.domain}:{'+'.join(self.kinds)}" if self.kinds else self.domain

    def rows(self, data: Path, manifest: dict, split: str) -> list[dict]:
        rows = read_split(data, manifest, self.domain, split)
        return [r for r in rows if r.get("kind") in self.kinds] if self.kinds else rows


def format_groups(groups: list[Group]) -> str:
    """The --groups text that parses back to `groups` (what the recipe records)."""
    return ",".join(g.name if g.source == g.name else f"{g.name}={g.source}" for g in groups)


def parse_groups(text: str, domains: tuple[str, ...]) -> list[Group]:
    """`NAME=SOURCE,...` with SOURCE a domain or `tasks:KIND+KIND`; a bare domain names itself."""
    groups: list[Group] = []
    for part in text.split(","):
        name, eq, source = (s.strip() for s in part.partition("="))
        source = source if eq else name
        domain, colon, kinds = source.partition(":")
        if not _NAME.fullmatch(name):
            raise UserError(f"--groups: {part.strip()!r} is not NAME=SOURCE (a name is a letter then letters, "
                            "digits, _ or -; a source with task kinds needs a name, e.g. arith=tasks:add+sub)")
        if domain not in domains:
            raise UserError(f"--groups: unknown domain {domain!r} in {part.strip()!r} "
                            f"(choose from {', '.join(domains)})")
        kind_list = tuple(k.strip() for k in kinds.split("+")) if colon else ()
        if colon and domain != TASKS_DOMAIN:
            raise UserError(f"--groups: only {TASKS_DOMAIN} rows have task kinds ({part.strip()!r})")
        unknown = [k for k in kind_list if k not in KINDS]
        if unknown:
            raise UserError(f"--groups: unknown task kind {unknown[0]!r} (choose from {', '.join(KINDS)})")
        groups.append(Group(name, domain, kind_list))
    _check_disjoint(groups)
    return groups


def _check_disjoint(groups: list[Group]):
    """A row in two groups would be counted for both: refuse repeated names, domains and kinds."""
    names = [g.name for g in groups]
    if len(set(names)) < len(names):
        raise UserError(f"--groups: a group name is repeated ({', '.join(names)})")
    for i, a in enumerate(groups):
        for b in groups[:i]:
            if a.domain == b.domain and (not a.kinds or not b.kinds or set(a.kinds) & set(b.kinds)):
                raise UserError(f"--groups: {b.name} and {a.name} share rows of {a.domain}")


# --------------------------------------------------------------------------- mixtures

MIXTURES = ("natural", "stratified", "static:NAME=WEIGHT,...", "aioli")


@dataclass(frozen=True)
class Mixture:
    kind: str  # natural | stratified | static | aioli
    weights: tuple[float, ...] | None = None  # static: normalised, in group order


def parse_mixture(text: str, names: list[str], option: str = "--mixture") -> Mixture:
    """natural | stratified | static:NAME=WEIGHT,... (every group named; weights >= 0, normalised) | aioli."""
    if text in ("natural", "stratified", "aioli"):
        return Mixture(text)
    kind, colon, spec = text.partition(":")
    if kind != "static" or not colon:
        raise UserError(f"{option}: {text!r} is not one of {' | '.join(MIXTURES)}")
    weights: dict[str, float] = {}
    for part in spec.split(","):
        name, _, value = (s.strip() for s in part.partition("="))
        if name not in names:
            raise UserError(f"{option}: {name!r} is not a group (groups: {', '.join(names)})")
        if name in weights:
            raise UserError(f"{option}: group {name} is given twice")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UserError(f"{option}: {part.strip()!r} is not NAME=WEIGHT") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise UserError(f"{option}: the weight of {name} must be a finite number >= 0")
    missing = [n for n in names if n not in weights]
    if missing:
        raise UserError(f"{option}: give every group a weight (missing: {', '.join(missing)}; 0 is allowed)")
    total = sum(weights.values())
    if total <= 0:
        raise UserError(f"{option}: at least one weight must be positive")
    return Mixture("static", tuple(weights[n] / total for n in names))


def uniform(m: int) -> torch.Tensor:
    return torch.full((m,), 1.0 / m, dtype=torch.float64)


# --------------------------------------------------------------------------- sampling

def systematic_counts(p: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Rows per group: each count is floor or ceil of p_i * batch_size, the counts sum to batch_size,
    and their expectation is exactly p_i * batch_size.

    One uniform offset u and the group boundaries B * cumsum(p): group i gets the integers k with
    k + u in its interval (systematic sampling). Deterministic largest-remainder rounding would be
    exact too, but it starves a small group for good: with B = 32, p = (0.02, 0.49, 0.49) it gives
    the first group 0 rows every step.
    """
    u = torch.rand((), generator=generator, dtype=torch.float64)
    edges = batch_size * torch.cumsum(p.to(torch.float64), 0)
    edges[-1] = batch_size  # no rounding drift at the end
    ceil = torch.ceil(edges - u).long()
    return torch.diff(ceil, prepend=torch.zeros(1, dtype=torch.long))


class MixtureSampler:
    """Random windows of per-group packed token streams, `systematic_counts(p)` rows per group.

    Offsets wrap around the stream, so a small group is simply repeated (more epochs).
    """

    def __init__(self, streams: list[torch.Tensor], p):
        self.streams = streams
        self.set_mixture(p)

    def set_mixture(self, p):
        p = torch.as_tensor(p, dtype=torch.float64)
        if p.shape != (len(self.streams),) or (p < 0).any() or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-9):
            raise ValueError(f"a mixture over {len(self.streams)} groups must be a probability vector, got {p}")
        self.p = p

    def sample(self, batch_size: int, seq_len: int, generator: torch.Generator) -> dict:
        counts = systematic_counts(self.p, batch_size, generator).tolist()
        rows = []
        for stream, count in zip(self.streams, counts):
            starts = torch.randint(len(stream), (count,), generator=generator)
            rows.append(stream[(starts[:, None] + torch.arange(seq_len)) % len(stream)])
        input_ids = torch.cat(rows)
        return {"input_ids": input_ids, "labels": input_ids}
