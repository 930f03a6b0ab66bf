"""Choosing the torch device: one place, with a clean fall-back to the CPU."""

from __future__ import annotations

import warnings

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
