"""Shapes image metrics on the attribute classifier's outputs (leanserve.eval.classifier).

- Fréchet distance (FD) between Gaussians fitted to two feature sets, as FID but in the
  classifier's feature space. Biased upward for finite sets: always report it next to the
  real-vs-real floor at the same set size.
- KID: unbiased squared MMD with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
  over random subsets (Binkowski et al. 2018); unbiased, so ~0 for equal distributions at any size.
- Alignment: does an image meet what its prompt specifies? Checked per attribute the prompt gives
  (parse_caption): one-object prompts check shape, colour, size and position against the object
  heads; two-object prompts check that every named shape and colour is present (which colour
  goes with which shape, and the sizes and positions, are not checked); every prompt checks the
  object count and, if given, the background.
- Diversity across seeds for one prompt: mean pairwise feature distance, near-duplicate pairs,
  and coverage = distinct predicted values / vocabulary size of each attribute the prompt leaves open.
- Memorisation: each image's distance to its nearest neighbour in a reference bank (training
  images), in pixels or features.
- Mode mixture (DPM-OT's MMR): the share of images whose class probabilities put >= tau on two or
  more classes, i.e. images that lie between modes.
FD, KID and distances are computed in float64 with torch (on the features' device), in the same
thread pool as the classifier.
"""
from __future__ import annotations

import numpy as np
import torch

from leanserve.data.shapes import OBJECT_ATTRIBUTES, VOCAB


def _as_float64(x) -> torch.Tensor:
    t = torch.as_tensor(x).to(torch.float64)
    if t.ndim != 2:
        raise ValueError(f"need features [N, D], got shape {tuple(t.shape)}")
    return t


def feature_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of features [N, D], in float64."""
    x = _as_float64(features)
    if len(x) < 2:
        raise ValueError("need at least 2 feature rows")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) = tr((R S2 R)^(1/2)) with R = S1^(1/2) (same eigenvalues: S1 S2 is similar to
    R S2 R), and R S2 R is symmetric positive semi-definite, so both roots come from eigh; the
    usual sqrtm of the non-symmetric product needs scipy and goes complex on rounding noise.
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    sigma1, sigma2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = root1 @ sigma2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * trace_root)


def frechet_distance(a, b) -> float:
    """FD between two feature sets [N, D] and [M, D] (NumPy arrays or tensors, any device)."""
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def kid(a, b, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID between feature sets [N, D] and [M, D]: (mean, std) over `num_subsets` random subsets
    of min(subset_size, N, M) rows of each (drawn without replacement)."""
    a, b = _as_float64(a), _as_float64(b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 rows in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = a[torch.from_numpy(rng.choice(len(a), m, replace=False)).to(a.device)]
        y = b[torch.from_numpy(rng.choice(len(b), m, replace=False)).to(b.device)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        within = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
        values.append(float(within - 2 * kxy.mean()))
    return float(np.mean(values)), float(np.std(values))


# --------------------------------------------------------------------------- alignment

def prompt_checks(spec: dict, pred: dict) -> dict[str, bool]:
    """attribute -> whether the image (classifier labels `pred`) meets the prompt (`spec`, as
    parse_caption returns it) on that attribute; only attributes the prompt specifies appear."""
    objects = spec["objects"]
    if not objects:
        raise ValueError("the prompt names no object, so there is nothing to check")
    checks = {"count": pred["count"] == len(objects)}
    if "background" in spec:
        checks["background"] = pred["background"] == spec["background"]
    if len(objects) == 1:
        checks |= {k: pred[k] == objects[0][k] for k in OBJECT_ATTRIBUTES if k in objects[0]}
    else:
        for attr, present in (("shape", "shapes_present"), ("color", "colors_present")):
            named = {o[attr] for o in objects if attr in o}
            if named:
                checks[attr] = named <= pred[present]
    return checks


def alignment(specs: list[dict], preds: list[dict]) -> dict[str, float]:
    """"all": share of images meeting every check of their prompt; per attribute: share meeting
    it among the prompts that specify it."""
    if len(specs) != len(preds) or not specs:
        raise ValueError(f"need one prediction per prompt, got {len(preds)} for {len(specs)}")
    hits: dict[str, list[bool]] = {}
    every = []
    for spec, pred in zip(specs, preds):
        checks = prompt_checks(spec, pred)
        every.append(all(checks.values()))
        for k, ok in checks.items():
            hits.setdefault(k, []).append(ok)
    return {"all": float(np.mean(every)), **{k: float(np.mean(v)) for k, v in sorted(hits.items())}}


# --------------------------------------------------------------------------- diversity

def pairwise_distances(features) -> np.ndarray:
    """Euclidean distances of all unordered pairs of rows (i < j)."""
    x = _as_float64(features)
    # torch.pdist works on differences, not |x|^2 + |y|^2 - 2xy: identical rows are exactly 0 apart
    return torch.pdist(x).cpu().numpy()


def unspecified_attributes(spec: dict) -> list[str]:
    """Attributes the prompt leaves open that the classifier can read: the background, and the
    object attributes of a one-object prompt."""
    open_ = [k for k in OBJECT_ATTRIBUTES if k not in spec["objects"][0]] if len(spec["objects"]) == 1 else []
    return open_ + ([] if "background" in spec else ["background"])


def coverage(preds: list[dict], attribute: str) -> float:
    """Distinct predicted values of `attribute` over the images, as a share of its vocabulary."""
    return len({p[attribute] for p in preds}) / len(VOCAB[attribute])


def diversity(spec: dict, features: np.ndarray, preds: list[dict], near_duplicate_distance: float) -> dict[str, float]:
    """Diversity of images generated for one prompt with different seeds: mean pairwise feature
    distance, share of pairs closer than `near_duplicate_distance`, and coverage of every
    attribute the prompt leaves open ("coverage.<attribute>")."""
    d = pairwise_distances(features)
    if not len(d):
        raise ValueError("diversity needs at least two images")
    out = {"pairwise_distance": float(d.mean()), "near_duplicates": float((d < near_duplicate_distance).mean())}
    out |= {f"coverage.{k}": coverage(preds, k) for k in unspecified_attributes(spec)}
    return out


# --------------------------------------------------------------------------- memorisation and mode mixture

def nearest_distances(x, bank, chunk: int = 1024) -> torch.Tensor:
    """Euclidean distance of each row of x [N, D] to its nearest row of bank [M, D], float64 on the
    bank's device. cdist's |x|^2 + |y|^2 - 2x.y route is fast on a GPU; in float64 an exact copy
    still comes out within ~1e-6 of 0. Chunked over x so that only [chunk, M] distances exist."""
    bank = _as_float64(bank)
    x = _as_float64(x).to(bank.device)
    if x.shape[1] != bank.shape[1] or not len(bank):
        raise ValueError(f"need x [N, D] and a non-empty bank [M, D]; got {tuple(x.shape)}, {tuple(bank.shape)}")
    return torch.cat([torch.cdist(x[s:s + chunk], bank).amin(1) for s in range(0, len(x), chunk)])


def mode_mixture(probs, taus) -> dict[float, float]:
    """tau -> share of rows of probs [N, C] (softmax outputs) with at least two classes >= tau."""
    p = torch.as_tensor(probs)
    if p.ndim != 2 or not len(p):
        raise ValueError(f"need probabilities [N, C], got shape {tuple(p.shape)}")
    return {tau: float(((p >= tau).sum(1) >= 2).double().mean()) for tau in taus}
