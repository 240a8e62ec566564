"""What the benchmark scripts' smoke tests share: the repository root and the scripts' environment."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def script_env() -> dict[str, str]:
    """A script run from ROOT with the repository importable (OMP_NUM_THREADS=1 comes from conftest)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
