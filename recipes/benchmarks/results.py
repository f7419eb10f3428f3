"""Where the single-device benchmarks put their results: a table on stdout and a JSON file
naming the device and torch version (recipes/benchmarks/kernels.py, virtual_ring.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def single_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def report(rows: list[dict], table: str, output: str, device: torch.device) -> None:
    """Print ``table`` and write ``rows`` with the device and torch version to ``output``."""
    import hydra

    print(table, flush=True)
    path = Path(hydra.utils.to_absolute_path(output))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                "torch": torch.__version__, "rows": rows}, indent=1))
