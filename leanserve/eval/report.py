"""What every eval and benchmark report shares: naming the hardware, writing the JSON."""
from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

from leanserve.atomic import atomic_write_text
from leanserve.errors import UserError


def hardware(device=None) -> str:
    """The GPU's name, or the CPU model and thread count: every number is reported with it."""
    import torch
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def provenance() -> dict:
    """The code and time a result comes from: the checkout's commit ("+dirty" with uncommitted
    changes, as model_dir.git_commit says) and the UTC date."""
    from leanserve.models.model_dir import git_commit
    return {"git_commit": git_commit() or "unknown",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def emit_json(result: dict, out: str | Path | None) -> None:
    """Write `result`, stamped with its provenance, to `out` (creating its folder), or print it when
    no path is given."""
    text = json.dumps({**provenance(), **result}, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)


def emit_json_section(key: str, result: dict, out: str | Path) -> None:
    """Write `result`, stamped with its own provenance, under `key` of the JSON object in `out`,
    keeping the file's other keys: experiments that share one results file (C1, C2 of the Bayes
    eval) are run separately, at different commits, so each section carries its own stamp.
    Read-modify-write without a lock: two runs finishing at the same moment would race."""
    path = Path(out)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{out}: not JSON ({e}); not overwriting it") from None
        if not isinstance(data, dict):
            raise UserError(f"{out}: holds a {type(data).__name__}, not an object of sections; not overwriting it")
    data[key] = {**provenance(), **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    print(f"wrote {out} [{key!r}]")
