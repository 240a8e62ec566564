"""The shapes attribute classifier: the fixed network behind every shapes image metric.

A small CNN trained once, on real rendered shapes only (never on generator outputs), predicts
from an image:
- `count` (one or two objects) and `background`, for every image;
- `shape`, `color`, `size`, `position` of the object, for one-object images (their heads are
  trained on those only: with two objects "the" object is undefined);
- `shapes_present` / `colors_present` (multi-label), for every image: what alignment can still
  check on two-object prompts, where binding (which colour goes with which shape) is not checked.
Its penultimate layer (after ReLU) is the feature space of FD, KID and diversity, scaled by one
constant fixed at training time so that real images' features have RMS 1 per dimension: KID's
cubic kernel (x.y / d + 1)^3 assumes features of order 1, as Inception's are.

Train it with `leanserve eval classifier --out zoo/shapes-classifier`: the data is
generated deterministically (leanserve.data.shapes, train split) and the held-out accuracy per head
(test split) is written to the directory's leanserve.json. Same seed and same thread count give
the same weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanserve.data import shapes
from leanserve.errors import UserError

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "zoo" / "shapes-classifier"
COUNTS = (1, 2)
# head -> labels; the *_present heads are multi-label over their vocabulary
HEADS: dict[str, tuple] = {
    "count": COUNTS, "background": shapes.BACKGROUNDS, "shape": shapes.SHAPES, "color": shapes.COLORS,
    "size": shapes.SIZES, "position": shapes.POSITIONS, "shapes_present": shapes.SHAPES, "colors_present": shapes.COLORS,
}
SINGLE_OBJECT_HEADS = ("shape", "color", "size", "position")
MULTI_LABEL_HEADS = ("shapes_present", "colors_present")


@dataclass
class ClassifierConfig:
    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 256  # 128 from the flattened map + channels[-1] max-pooled
    feature_scale: float = 1.0  # applied to the features `predict` returns (see the module docstring)
    heads: dict[str, list] = field(default_factory=lambda: {k: list(v) for k, v in HEADS.items()})


class AttributeClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for c in config.channels:  # conv-BN-ReLU then halve: 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        side = config.resolution >> len(config.channels)
        # two views of the last feature map: flattened (where things are: position, layout) and
        # globally max-pooled (what is anywhere: the *_present heads of two-object images)
        self.fc = nn.Linear(c_in * side * side, config.feature_dim - c_in)
        self.heads = nn.ModuleDict({k: nn.Linear(config.feature_dim, len(v)) for k, v in config.heads.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x float [N, 3, H, W] in [-1, 1] -> (features [N, feature_dim], logits per head)."""
        side = self.config.resolution
        if x.shape[-2:] != (side, side):  # e.g. a 64x64 model's images: box-filtered down like the renderer
            x = F.interpolate(x, size=(side, side), mode="area" if x.shape[-1] > side else "bilinear")
        h = self.trunk(x)
        features = torch.cat([F.relu(self.fc(h.flatten(1))), h.amax((2, 3))], 1)
        return features, {k: head(features) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 512) -> Predictions:
        """Features, probabilities and labels of images: uint8 [N, H, W, 3], or float in [0, 1]
        (a diffusers pipeline's output_type="np"), which is quantised to uint8 first, as a
        served PNG would be."""
        images = to_uint8(images)
        if not len(images):
            raise ValueError("no images to classify")
        device = next(self.parameters()).device
        feats, probs = [], {k: [] for k in self.heads}
        for start in range(0, len(images), batch_size):
            x = shapes.to_tensor(images[start:start + batch_size]).to(device)
            f, logits = self(x)
            feats.append(f.double().cpu() * self.config.feature_scale)
            for k, v in logits.items():
                p = torch.sigmoid(v) if k in MULTI_LABEL_HEADS else torch.softmax(v, -1)
                probs[k].append(p.cpu())
        return Predictions(torch.cat(feats).numpy(), {k: torch.cat(v).numpy() for k, v in probs.items()},
                           self.config.heads)


@dataclass
class Predictions:
    features: np.ndarray                 # [N, feature_dim] float64: FD / KID / diversity space
    probs: dict[str, np.ndarray]         # head -> [N, classes]: softmax, or sigmoid for *_present
    vocab: dict[str, list]               # head -> labels

    def __len__(self) -> int:
        return len(self.features)

    def labels(self) -> list[dict]:
        """Per image: the arg-max label of every single-choice head and the set of labels above
        0.5 of every multi-label head."""
        out = [{} for _ in range(len(self))]
        for k, p in self.probs.items():
            vocab = self.vocab[k]
            for row, probs in zip(out, p):
                row[k] = {vocab[j] for j in np.flatnonzero(probs > 0.5)} if k in MULTI_LABEL_HEADS else vocab[int(probs.argmax())]
        return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


# --------------------------------------------------------------------------- loading

def load_classifier(model_dir: str | Path | None = None, device: str | torch.device = "cpu") -> AttributeClassifier:
    """The trained classifier (default: zoo/shapes-classifier of this checkout), in eval mode."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir) if model_dir is not None else DEFAULT_DIR
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise UserError(f"no classifier in {model_dir} (expected config.json + model.safetensors); "
                        "train one with `leanserve eval classifier --out DIR`")
    raw = json.loads((model_dir / "config.json").read_text())
    config = ClassifierConfig(**{**raw, "channels": tuple(raw["channels"])})
    if config.heads != {k: list(v) for k, v in HEADS.items()}:
        raise UserError(f"the classifier in {model_dir} was trained for another shapes vocabulary; retrain it")
    model = AttributeClassifier(config)
    model.load_state_dict(load_file(model_dir / "model.safetensors"))
    return model.to(device).eval()


def save_classifier(model: AttributeClassifier, out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")


# --------------------------------------------------------------------------- data and scoring

@dataclass
class LabelledImages:
    images: np.ndarray               # uint8 [N, H, W, 3]
    targets: dict[str, np.ndarray]   # head -> int [N] (-1: not defined for this image) or {0,1} [N, classes]


def labelled_images(seed: int, count: int, split: str, resolution: int = 32, two_object_prob: float = 0.35) -> LabelledImages:
    """`count` real examples of the (split, seed) stream with their targets per head."""
    images = np.empty((count, resolution, resolution, 3), np.uint8)
    targets = {k: np.full(count, -1, np.int64) for k in HEADS if k not in MULTI_LABEL_HEADS}
    targets |= {k: np.zeros((count, len(HEADS[k])), np.float32) for k in MULTI_LABEL_HEADS}
    for i in range(count):
        ex = shapes.sample(seed, i, resolution, split=split, two_object_prob=two_object_prob)
        images[i] = ex.image
        objects = ex.attrs["objects"]
        targets["count"][i] = COUNTS.index(len(objects))
        targets["background"][i] = shapes.BACKGROUNDS.index(ex.attrs["background"])
        if len(objects) == 1:
            for k in SINGLE_OBJECT_HEADS:
                targets[k][i] = HEADS[k].index(objects[0][k])
        for o in objects:
            targets["shapes_present"][i, shapes.SHAPES.index(o["shape"])] = 1
            targets["colors_present"][i, shapes.COLORS.index(o["color"])] = 1
    return LabelledImages(images, targets)


def head_accuracy(predictions: Predictions, targets: dict[str, np.ndarray]) -> dict[str, float]:
    """Accuracy per head over the images where it is defined (multi-label: the exact set), and
    `single_object_all`: one-object images with every single-choice head right."""
    acc, all_right = {}, np.ones(len(targets["count"]), bool)
    for k, p in predictions.probs.items():
        t = targets[k]
        if k in MULTI_LABEL_HEADS:
            right = ((p > 0.5) == (t > 0.5)).all(1)
            defined = np.ones(len(t), bool)
        else:
            right, defined = p.argmax(1) == t, t >= 0
        acc[k] = float(right[defined].mean()) if defined.any() else float("nan")
        if k not in MULTI_LABEL_HEADS:
            all_right &= right | ~defined
    acc["single_object_all"] = float(all_right[targets["count"] == COUNTS.index(1)].mean())
    return acc


def _loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    total = 0.0
    for k, v in logits.items():
        t = targets[k]
        if k in MULTI_LABEL_HEADS:
            total = total + F.binary_cross_entropy_with_logits(v, t)
        else:
            total = total + F.cross_entropy(v, t, ignore_index=-1)
    return total


def train(seed: int = 0, num_train: int = 40_000, epochs: int = 3, batch_size: int = 128, lr: float = 3e-3,
          config: ClassifierConfig | None = None, progress: bool = True) -> tuple[AttributeClassifier, str]:
    """Train on `num_train` images of the train split; returns the model and the data's sha256."""
    from tqdm import tqdm

    config = config or ClassifierConfig()
    data = labelled_images(seed, num_train, "train", config.resolution)
    digest = hashlib.sha256(data.images.tobytes())
    for k in sorted(data.targets):
        digest.update(data.targets[k].tobytes())
    torch.manual_seed(seed)
    model = AttributeClassifier(config)
    x_all = shapes.to_tensor(data.images)
    t_all = {k: torch.from_numpy(v) for k, v in data.targets.items()}
    steps = epochs * (num_train // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    order_gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(total=steps, desc="train classifier", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(num_train, generator=order_gen)
        for start in range(0, num_train - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            _, logits = model(x_all[idx])
            loss = _loss(logits, {k: v[idx] for k, v in t_all.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval(), digest.hexdigest()


# --------------------------------------------------------------------------- command

def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, help="directory to write (model.safetensors, config.json, leanserve.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=40_000, help="training images (train split)")
    p.add_argument("--num-test", type=int, default=4_000, help="held-out images for the reported accuracy (test split)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)


def run(args) -> int:
    from leanserve.models.model_dir import ModelInfo, make_recipe, save_model_info

    for name in ("num_train", "num_test", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0")
    if args.num_train < args.batch_size:
        raise UserError("--num-train must be at least --batch-size")
    model, data_sha = train(args.seed, args.num_train, args.epochs, args.batch_size, args.lr)
    test = labelled_images(args.seed, args.num_test, "test")
    predictions = model.predict(test.images)
    accuracy = head_accuracy(predictions, test.targets)
    model.config.feature_scale = float(1 / np.sqrt(np.mean(predictions.features ** 2)))
    save_classifier(model, args.out)
    info = ModelInfo(
        kind="image", method="attribute-classifier", settings=asdict(model.config),
        recipe=make_recipe("leanserve eval classifier", args, args.seed),
        data={"description": f"leanserve.data.shapes train split, seed {args.seed}, {args.num_train} images "
                             "(35% with two objects)", "sha256": data_sha},
        metrics={"test_accuracy": accuracy, "num_test": args.num_test, "torch_threads": torch.get_num_threads()},
    )
    save_model_info(args.out, info)
    print(json.dumps({"out": str(args.out), "test_accuracy": accuracy}, indent=2))
    return 0

