"""What every benchmark script needs: the machine's name for its report, and silence for library output."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (the processor string elsewhere)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def quiet(verbose: bool = False) -> contextlib.AbstractContextManager:
    """stdout and stderr to /dev/null, unless verbose."""
    if verbose:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    devnull = stack.enter_context(open(os.devnull, "w"))
    stack.enter_context(contextlib.redirect_stdout(devnull))
    stack.enter_context(contextlib.redirect_stderr(devnull))
    return stack


def write_report(report: dict, out: Path | None, default_name: str) -> Path:
    """The report as JSON at `out`, or at benchmarks/results/<default_name>.json."""
    import json

    out = out or Path(__file__).parent / "results" / f"{default_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
