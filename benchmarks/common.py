"""Shared by benchmark scripts: hardware naming and the results JSON format."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from leanserve.eval.report import hardware
from leanserve.models.model_dir import git_commit

RESULTS = Path(__file__).parent / "results"


def write_result(bench: str, results: dict, out_dir: str | Path = RESULTS) -> Path:
    """Write {bench, hardware, git_commit, date, results} to OUT/<bench>-<hardware>.json."""
    hw = hardware()
    payload = {"bench": bench, "hardware": hw, "git_commit": git_commit() or "unknown",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "results": results}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in hw.lower()).strip("-")[:40]
    path = out / f"{bench}-{slug}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    import torch
    import triton.testing
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e9
