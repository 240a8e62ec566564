"""`leanserve.json`: what a model directory is, how it was made, and how well it does.

Every artifact leanserve writes is a plain transformers/diffusers directory plus this file
(docs/architecture.md, "Model directories"). Readers must accept directories without it (dense, as-is).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from leanserve.atomic import atomic_write_text

FILENAME = "leanserve.json"
KINDS = ("llm", "image")


@dataclass
class ModelInfo:
    kind: str                                           # llm | image
    method: str                                         # dense, moa, moepp, sid, dpm_ot, ensemble, ...
    settings: dict = field(default_factory=dict)        # the method's own settings (MoA plan, SiD K, ...)
    base: dict | None = None                            # {"path", "sha256"} of the model this one came from
    recipe: dict = field(default_factory=dict)          # {"command", "git_commit", "seed"}
    data: dict | None = None                            # {"description", "sha256"}
    metrics: dict = field(default_factory=dict)
    created: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


def save_model_info(model_dir: str | Path, info: ModelInfo) -> Path:
    """Write `leanserve.json` atomically; `created` is stamped now unless already set."""
    if not info.created:
        info.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = Path(model_dir) / FILENAME
    atomic_write_text(path, json.dumps(asdict(info), indent=2, sort_keys=False) + "\n")
    return path


def load_model_info(model_dir: str | Path) -> ModelInfo | None:
    """The directory's `leanserve.json`, or None for a plain transformers/diffusers directory."""
    path = Path(model_dir) / FILENAME
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    known = {f.name for f in fields(ModelInfo)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return ModelInfo(**raw)


def check_complete(model_dir: str | Path) -> None:
    """UserError naming the first file of `model_dir` (or of its component folders) that a save or a
    copy cut short: JSON that does not parse, a safetensors file shorter than its header says, a
    pipeline component (model_index.json) without its folder and config. Loaders call this first,
    so that a half-written directory costs one line, not a library's traceback."""
    from safetensors import SafetensorError, safe_open

    from leanserve.errors import UserError

    root = Path(model_dir)
    for path in sorted([*root.glob("*.json"), *root.glob("*/*.json")]):
        try:
            json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}): the model directory is incomplete or corrupt") from None
    index = root / "model_index.json"
    components = json.loads(index.read_text()) if index.is_file() else {}
    for name, value in components.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] not in ("diffusers", "transformers"):
            continue  # settings, components saved as None, others' code (the loaders refuse that)
        if not any((root / name).glob("*config.json")):  # config.json, scheduler_config.json, ...
            raise UserError(f"{root / name} has no config file, but model_index.json lists it: "
                            "the model directory is incomplete or corrupt")
    for path in sorted([*root.glob("*.safetensors"), *root.glob("*/*.safetensors")]):
        try:
            # opening reads the header and checks the file holds every tensor it lists; numpy: the
            # header check needs no tensors, and an LLM server's API process never imports torch
            with safe_open(str(path), framework="numpy"):
                pass
        except SafetensorError as e:
            raise UserError(f"{path}: {e}: the model directory is incomplete or corrupt") from None


# tokenizer_config.json classes that are exactly transformers' fast tokenizer over tokenizer.json
# (ours and Llama 3's): loaded without AutoTokenizer, whose class registry costs ~2 s of CPU in
# every process that starts (the API process and the engine core each load one)
_PLAIN_FAST_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(model_dir: str | Path):
    """The tokenizer of a model directory, as AutoTokenizer.from_pretrained loads it."""
    root = Path(model_dir)
    config_file = root / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("tokenizer_class") in _PLAIN_FAST_TOKENIZERS and (root / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(root)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(root)


def merge_metrics(model_dir: str | Path, metrics: dict) -> bool:
    """Merge `metrics` into an existing `leanserve.json` (top-level keys replaced); False if there is none."""
    info = load_model_info(model_dir)
    if info is None:
        return False
    info.metrics.update(metrics)
    save_model_info(model_dir, info)
    return True


def git_commit() -> str | None:
    """HEAD of the checkout leanserve runs from, with "+dirty" when it has uncommitted changes;
    $LEANSERVE_GIT_COMMIT where the tree was copied without .git (a lent GPU machine)."""
    if os.environ.get("LEANSERVE_GIT_COMMIT"):
        return os.environ["LEANSERVE_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (installed wheel): the version still identifies the code
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def command_line(words: str, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> str:
    """The full command that reproduces `args`, every option spelled out (defaults included,
    so a later change of defaults does not change what the recipe means)."""
    parts = words.split()
    for key, value in vars(args).items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def make_recipe(words: str, args: argparse.Namespace, seed: int, skip: tuple[str, ...] = ()) -> dict:
    return {"command": command_line(words, args, skip), "git_commit": git_commit(), "seed": seed}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(model_dir: str | Path) -> str:
    """One hash over a directory's config and weight files (sorted by relative path), for `base`."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not (path.suffix == ".safetensors" or path.name == "config.json"):
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0" + file_sha256(path).encode())
    return h.hexdigest()
