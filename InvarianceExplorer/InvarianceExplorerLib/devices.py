"""Choosing the torch device: one place, with a clean fall-back to the CPU."""

from __future__ import annotations

import platform
import warnings
from typing import Optional

import torch


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else the CPU; an explicit ``"cuda"`` on a machine
    without a usable GPU falls back to the CPU with a warning instead of failing."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but no CUDA GPU is available; using the CPU", RuntimeWarning)
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda'") from exc


def machine(device: Optional[torch.device] = None) -> dict:
    """The hardware and software of this run (CPU model from ``/proc/cpuinfo``, threads,
    versions; the GPU name when ``device`` is CUDA), for model cards and benchmark tables."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if device is not None:
        info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return info


def cpu_words(info: dict) -> str:
    """"<CPU model>, <n> thread(s)" of a :func:`machine` record, for model cards."""
    n = info.get("cpu_threads")
    return f"{info.get('cpu')}, {n} thread{'' if n == 1 else 's'}"
