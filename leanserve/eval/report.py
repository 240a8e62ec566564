"""What every eval and benchmark report shares: naming the hardware, writing the JSON."""
from __future__ import annotations

import json
import platform
from pathlib import Path


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


def emit_json(result: dict, out: str | Path | None) -> None:
    """Write `result` to `out` (creating its folder), or print it when no path is given."""
    text = json.dumps(result, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(f"wrote {out}")
    else:
        print(text)
