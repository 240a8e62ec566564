"""The shapes text-to-image set: one or two coloured shapes on a plain background, with captions.

Every example is a pure function of (split, seed, index): a NumPy Generator seeded from all three
draws the scene and its caption, so the data is effectively unlimited, identical on every machine,
and the train/val/test splits are disjoint random streams (the split is part of the seed).

A scene (`attrs`) fixes everything `render` needs: the background and, per object, its shape,
colour, size, position (a 3x3 grid) and the nuisances no caption mentions (rotation, a small
offset, a size jitter, a colour tint). A caption mentions a subset of the attributes, chosen per
attribute at random (under-specified captions: "a red circle" says nothing about size, position
or background); `attrs["specified"]` records that subset in exactly the form `parse_caption`
returns, so a prompt's requirements are known for alignment scoring:

    {"objects": [{"shape": "circle", "color": "red", "position": "top left"}, ...], "background": "white"}

Objects appear in caption order; an object names its shape unless the caption says "shape" /
"object". Two objects never overlap: their grid cells are at least two cells apart.
Images are rendered at 4x and box-filtered down (anti-aliased edges).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "ring")
COLORS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES = ("small", "medium", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("black", "white", "gray", "navy")
# attributes of one object, in caption order; `background` belongs to the scene
OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")
ATTRIBUTES = OBJECT_ATTRIBUTES + ("background",)
VOCAB = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}

RGB = {
    "red": (220, 30, 35), "orange": (245, 135, 20), "yellow": (245, 220, 40), "green": (35, 165, 60),
    "cyan": (40, 210, 220), "blue": (35, 75, 225), "purple": (135, 50, 185), "pink": (250, 135, 195),
}
BACKGROUND_RGB = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (125, 125, 125), "navy": (20, 28, 75)}
# shape colours and background colours are disjoint, so an object never vanishes into its background

# first entry is the canonical word (used by `describe`); all entries are recognised by `parse_caption`
SHAPE_WORDS = {
    "circle": ("circle", "disc", "disk"), "square": ("square",), "triangle": ("triangle",), "star": ("star",),
    "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus"), "heart": ("heart",), "ring": ("ring", "donut", "hoop"),
}
GENERIC_NOUNS = ("shape", "object", "figure")  # an object whose shape the caption leaves open
COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "orange": ("orange", "tangerine"), "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"), "cyan": ("cyan", "turquoise", "aqua"), "blue": ("blue", "cobalt", "azure"),
    "purple": ("purple", "violet"), "pink": ("pink", "rose"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
POSITION_PHRASES = {
    "top left": ("in the top left", "in the upper left", "in the top left corner"),
    "top": ("at the top", "near the top", "at the top center"),
    "top right": ("in the top right", "in the upper right", "in the top right corner"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "in the centre"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left", "in the lower left", "in the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right", "in the lower right", "in the bottom right corner"),
}
BACKGROUND_WORDS = {"black": ("black",), "white": ("white",), "gray": ("gray", "grey"), "navy": ("navy", "dark blue")}
TEMPLATES = ("{}", "a picture of {}", "an image of {}", "an image showing {}", "there is {}", "a drawing of {}",
             "a simple illustration of {}")
BACKGROUND_TEMPLATES = ("{} on a {} background", "{} against a {} background", "{}, {} background")
JOINERS = (" and ", ", and ", " as well as ")

SPLITS = ("train", "val", "test")
SUPERSAMPLE = 4
CELL_CENTERS = (0.25, 0.5, 0.75)            # grid row/column centres, as fractions of the side
RADIUS = {"small": 0.125, "medium": 0.17, "large": 0.21}  # fraction of the side
MAX_OFFSET = 0.02                            # centre jitter, fraction of the side
MAX_SCALE_JITTER = 0.04
MAX_ROTATION = 15.0                          # degrees; small, so a square never looks like a diamond
MAX_TINT = 12                                # per-channel colour jitter


@dataclass
class Example:
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    attrs: dict        # the full scene (what `render` draws) plus "specified" (what the caption says)


# --------------------------------------------------------------------------- rendering

def _cell(position: str) -> tuple[int, int]:
    i = POSITIONS.index(position)
    return divmod(i, 3)  # (row, column), row 0 at the top


def _polygons(shape: str) -> list[tuple[np.ndarray, int]]:
    """(vertices [n, 2] in units of the radius, y up; fill 255 or 0) drawn in order into a mask."""
    def regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
        a = phase + 2 * np.pi * np.arange(n) / n
        return r * np.stack([np.cos(a), np.sin(a)], 1)

    if shape == "circle":
        return [(regular(48, 1.0), 255)]
    if shape == "ring":
        return [(regular(48, 1.0), 255), (regular(48, 0.55), 0)]
    if shape == "square":
        return [(regular(4, 0.82 * np.sqrt(2), np.pi / 4), 255)]
    if shape == "diamond":
        return [(np.array([[0, 1.05], [0.68, 0], [0, -1.05], [-0.68, 0]]), 255)]
    if shape == "triangle":
        return [(regular(3, 1.1, np.pi / 2), 255)]
    if shape == "star":
        outer, inner = regular(5, 1.1, np.pi / 2), regular(5, 0.48, np.pi / 2 + np.pi / 5)
        return [(np.stack([outer, inner], 1).reshape(10, 2), 255)]
    if shape == "cross":
        w, h = 0.3, 0.95
        return [(np.array([[-w, -h], [w, -h], [w, h], [-w, h]]), 255), (np.array([[-h, -w], [h, -w], [h, w], [-h, w]]), 255)]
    if shape == "heart":  # the classic parametric heart, scaled into the unit disc
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t) + 2.5
        return [(np.stack([x, y], 1) / 16.5, 255)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(attrs: dict, resolution: int = 32) -> np.ndarray:
    """Draw a scene as uint8 [resolution, resolution, 3].

    `attrs`: {"background", "objects": [{"shape", "color", "size", "position"}, ...]}; each object may
    also give "rotation" (degrees), "offset" ([dx, dy], fraction of the side), "scale" and "rgb"
    (defaults: none of these nuisances), the scene may give "background_rgb".
    """
    from PIL import Image, ImageDraw

    side = resolution * SUPERSAMPLE
    bg = tuple(attrs.get("background_rgb") or BACKGROUND_RGB[attrs["background"]])
    canvas = Image.new("RGB", (side, side), bg)
    for obj in attrs["objects"]:
        row, col = _cell(obj["position"])
        dx, dy = obj.get("offset", (0.0, 0.0))
        cx, cy = (CELL_CENTERS[col] + dx) * side, (CELL_CENTERS[row] + dy) * side
        radius = RADIUS[obj["size"]] * obj.get("scale", 1.0) * side
        theta = np.deg2rad(obj.get("rotation", 0.0))
        rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        mask = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        for vertices, fill in _polygons(obj["shape"]):
            xy = vertices @ rot.T * radius
            draw.polygon([(cx + x, cy - y) for x, y in xy], fill=fill)  # image y grows downwards
        canvas.paste(tuple(obj.get("rgb") or RGB[obj["color"]]), mask=mask)
    return np.array(canvas.reduce(SUPERSAMPLE))  # box filter over each 4x4 block: anti-aliasing


# --------------------------------------------------------------------------- scenes

def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _far_apart(a: str, b: str) -> bool:
    """Cells at least two apart in row or column: shapes of any size there cannot overlap."""
    (r1, c1), (r2, c2) = _cell(a), _cell(b)
    return max(abs(r1 - r2), abs(c1 - c2)) >= 2


def _tint(rng: np.random.Generator, rgb: tuple[int, int, int]) -> list[int]:
    return [int(v) for v in np.clip(np.array(rgb) + rng.integers(-MAX_TINT, MAX_TINT + 1, 3), 0, 255)]


def complete(rng: np.random.Generator, spec: dict) -> dict:
    """A full scene satisfying `spec` (parse_caption's form); unspecified attributes drawn from `rng`."""
    objects_spec = spec["objects"]
    if not 1 <= len(objects_spec) <= 2:
        raise ValueError(f"a scene has one or two objects, the spec has {len(objects_spec)}")
    given_values = [(k, v) for o in objects_spec for k, v in o.items()]
    given_values += [("background", spec["background"])] if "background" in spec else []
    for key, value in given_values:
        if value not in VOCAB.get(key, ()):
            raise ValueError(f"unknown {key} {value!r}")
    given = [o.get("position") for o in objects_spec]
    # positions are drawn jointly: uniform over the layouts the spec allows
    layouts = [p for p in product(POSITIONS, repeat=len(given))
               if all(g in (None, q) for g, q in zip(given, p)) and (len(p) == 1 or _far_apart(*p))]
    if not layouts:
        raise ValueError(f"no layout places two objects at {given} without overlap "
                         "(two objects need cells two apart, so never the center)")
    positions = _pick(rng, layouts)
    background = spec.get("background") or _pick(rng, BACKGROUNDS)
    objects = []
    for o, position in zip(objects_spec, positions):
        color = o.get("color") or _pick(rng, COLORS)
        objects.append({
            "shape": o.get("shape") or _pick(rng, SHAPES), "color": color,
            "size": o.get("size") or _pick(rng, SIZES), "position": position,
            "rotation": float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
            "offset": [float(v) for v in rng.uniform(-MAX_OFFSET, MAX_OFFSET, 2)],
            "scale": float(rng.uniform(1 - MAX_SCALE_JITTER, 1 + MAX_SCALE_JITTER)),
            "rgb": _tint(rng, RGB[color]),
        })
    return {"background": background, "background_rgb": _tint(rng, BACKGROUND_RGB[background]), "objects": objects}


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be >= 0")
    return np.random.default_rng([SPLITS.index(split), seed, index])


def scene(seed: int, index: int, *, split: str = "train", two_object_prob: float = 0.25, drop_prob: float = 0.2,
          background_prob: float = 0.5) -> tuple[dict, str]:
    """(attrs, caption) of example `index` of the (split, seed) stream, without rendering: the
    caption-only consumers (data-free distillation) skip the image, ~0.5 ms per example.

    Each object attribute is left out of the caption with probability `drop_prob` (the shape with
    `drop_prob / 4`: a caption names a shape most of the time), the background is mentioned with
    probability `background_prob`.
    """
    rng = _rng(split, seed, index)
    n = 2 if rng.random() < two_object_prob else 1
    attrs = complete(rng, {"objects": [{}] * n})
    specified: dict = {"objects": []}
    for obj in attrs["objects"]:
        keep = {"shape": rng.random() >= drop_prob / 4}
        keep |= {k: rng.random() >= drop_prob for k in OBJECT_ATTRIBUTES[1:]}
        specified["objects"].append({k: obj[k] for k in OBJECT_ATTRIBUTES if keep[k]})
    if rng.random() < background_prob:
        specified["background"] = attrs["background"]
    attrs["specified"] = specified
    return attrs, describe(specified, rng)


def sample(seed: int, index: int, resolution: int = 32, *, split: str = "train", **scene_kwargs) -> Example:
    """Example `index` of the (split, seed) stream: `scene` rendered at `resolution`."""
    attrs, caption = scene(seed, index, split=split, **scene_kwargs)
    return Example(render(attrs, resolution), caption, attrs)


def sample_for_prompt(prompt: str | dict, seed: int, index: int, resolution: int = 32, *,
                      split: str = "test") -> Example:
    """A real image for `prompt` (a caption or parse_caption's spec): what it specifies, with
    everything else drawn at random from example `index` of the (split, seed) stream. Two disjoint
    index ranges give two independent real sets for the same prompts (the FD noise floor)."""
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    attrs = complete(_rng(split, seed, index), spec)
    attrs["specified"] = spec
    caption = prompt if isinstance(prompt, str) else describe(spec)
    return Example(render(attrs, resolution), caption, attrs)


# --------------------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(spec: dict, rng: np.random.Generator | None = None) -> str:
    """A caption saying exactly what `spec` specifies: canonical words and the plain template
    without `rng`, random synonyms/templates/joiners with it."""
    choose = (lambda options: options[0]) if rng is None else (lambda options: _pick(rng, options))
    phrases = []
    for o in spec["objects"]:
        words = [choose(SIZE_WORDS[o["size"]])] if "size" in o else []
        words += [choose(COLOR_WORDS[o["color"]])] if "color" in o else []
        words += [choose(SHAPE_WORDS[o["shape"]]) if "shape" in o else choose(GENERIC_NOUNS)]
        phrase = f"{_article(words[0])} {' '.join(words)}"
        if "position" in o:
            phrase += " " + choose(POSITION_PHRASES[o["position"]])
        phrases.append(phrase)
    text = phrases[0] if len(phrases) == 1 else choose(JOINERS).join(phrases)
    text = choose(TEMPLATES).format(text)
    if "background" in spec:
        text = choose(BACKGROUND_TEMPLATES).format(text, choose(BACKGROUND_WORDS[spec["background"]]))
    return text


def _lookup(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {word: label for label, words in table.items() for word in words}


_SHAPE_OF, _COLOR_OF, _SIZE_OF = _lookup(SHAPE_WORDS), _lookup(COLOR_WORDS), _lookup(SIZE_WORDS)
_BACKGROUND_OF = _lookup(BACKGROUND_WORDS)
_BACKGROUND_RE = re.compile(r"(?:,|\bon|\bagainst)\s+(?:an?\s+)?(" + "|".join(
    sorted(map(re.escape, _BACKGROUND_OF), key=len, reverse=True)) + r")\s+background\b")
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTER = ("center", "centre", "middle")
_FILLER = ("in", "at", "on", "near", "the", "corner", "side")


def parse_caption(caption: str) -> dict:
    """The attributes a caption specifies, as {"objects": [{attr: label}], "background"?: label}.

    Inverts `describe` exactly; for free text it recognises the same vocabulary (adjectives before
    a shape noun, a position phrase after it or before the adjectives, "on a ... background").
    Words it does not know are ignored; contradictions ("small large circle") raise ValueError.
    """
    text = caption.lower()
    spec: dict = {}
    if m := _BACKGROUND_RE.search(text):
        spec["background"] = _BACKGROUND_OF[m.group(1)]
        text = text[:m.start()] + " " + text[m.end():]
    objects: list[dict] = []
    pending: dict = {}       # adjectives (and a leading position) of the object being read
    where: list[str] = []    # the position phrase being read

    def put(target: dict, key: str, value: str):
        if key in target and target[key] != value:
            raise ValueError(f"caption {caption!r} gives two {key}s: {target[key]!r} and {value!r}")
        target[key] = value

    def flush_position():
        if not where:
            return
        vertical = {_VERTICAL[w] for w in where if w in _VERTICAL}
        horizontal = {_HORIZONTAL[w] for w in where if w in _HORIZONTAL}
        if len(vertical) > 1 or len(horizontal) > 1:
            raise ValueError(f"caption {caption!r} has a contradictory position {' '.join(where)!r}")
        position = " ".join([*vertical, *horizontal]) or "center"
        # after a noun it describes that object, unless the next object's adjectives have begun
        attach_to_last = objects and "position" not in objects[-1] and not pending
        put(objects[-1] if attach_to_last else pending, "position", position)
        where.clear()

    for token in re.findall(r"[a-z]+(?:-[a-z]+)*", text):
        if token in _VERTICAL or token in _HORIZONTAL or token in _CENTER:
            where.append(token)
            continue
        if token in _FILLER:
            continue
        flush_position()
        if token in _SIZE_OF:
            put(pending, "size", _SIZE_OF[token])
        elif token in _COLOR_OF:
            put(pending, "color", _COLOR_OF[token])
        elif token in _SHAPE_OF or token in GENERIC_NOUNS:
            obj = dict(pending)
            if token in _SHAPE_OF:
                obj["shape"] = _SHAPE_OF[token]
            objects.append({k: obj[k] for k in OBJECT_ATTRIBUTES if k in obj})
            pending = {}
    flush_position()
    if pending:
        raise ValueError(f"caption {caption!r} has attributes {pending} but no shape noun after them")
    return {"objects": objects, **spec}


# --------------------------------------------------------------------------- prompt sets

def _eval_specs(n: int = 72, seed: int = 20240605) -> list[dict]:
    """Fully specified one-object scenes, every shape, colour, size, position and background
    used (nearly) equally often: each attribute column is a shuffled repetition of its vocabulary."""
    rng = np.random.default_rng(seed)
    while True:  # redraw until no scene repeats
        columns = {k: rng.permutation(np.resize(np.arange(len(v)), n)) for k, v in VOCAB.items()}
        rows = {tuple(int(columns[k][i]) for k in ATTRIBUTES) for i in range(n)}
        if len(rows) == n:
            break
    return [{"objects": [{k: VOCAB[k][columns[k][i]] for k in OBJECT_ATTRIBUTES}],
             "background": VOCAB["background"][columns["background"][i]]} for i in range(n)]


# The held-out prompt set for FD/KID and alignment: canonical phrasing, every attribute given.
EVAL_PROMPTS: tuple[str, ...] = tuple(describe(s) for s in _eval_specs())
# Prompts that leave attributes open, for diversity and coverage of what they do not say.
UNDERSPECIFIED_PROMPTS: tuple[str, ...] = (
    "a red circle", "a large star", "a square in the top left", "a blue shape",
    "a small triangle on a white background", "a green diamond at the bottom", "a cross", "a shape in the center",
)


# --------------------------------------------------------------------------- torch dataset

class ShapesDataset(Dataset):
    """`length` examples of the (split, seed) stream as (float [3, H, W] in [-1, 1], caption)."""

    def __init__(self, seed: int = 0, length: int = 100_000, resolution: int = 32, split: str = "train", **sample_kwargs):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if resolution not in (32, 64):
            raise ValueError(f"resolution must be 32 or 64, got {resolution}")
        self.seed, self.length, self.resolution, self.split = seed, length, resolution, split
        self.sample_kwargs = sample_kwargs

    def __len__(self) -> int:
        return self.length

    def example(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return sample(self.seed, index, self.resolution, split=self.split, **self.sample_kwargs)

    def __getitem__(self, index: int):
        ex = self.example(index)
        return to_tensor(ex.image), ex.caption


def to_tensor(images: np.ndarray):
    """uint8 [H, W, 3] or [N, H, W, 3] -> float [3, H, W] / [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    return x.movedim(-1, -3)
