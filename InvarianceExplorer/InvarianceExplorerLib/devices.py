"""Choosing the torch device, with a clean fall-back to the CPU, and replaying work on CUDA as a graph."""

from __future__ import annotations

import platform
import subprocess
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch


def resolve_device(device="auto") -> torch.device:
    """``"auto"`` (or None, "") picks CUDA when present, else the CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` (or the GPU index N, as torch reads an int), ``"mps"`` or a torch.device.
    A GPU asked for on a machine without one falls back to the CPU with a warning instead of
    failing; ``ValueError`` for anything else (a GPU index the machine lacks, other device
    types)."""
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    name = str(device if device not in (None, "") else "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda", "mps") or (chosen.type == "cpu" and chosen.index):
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' (or 'cuda:N') or 'mps'")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {device!r} requested but no CUDA GPU is available; using the CPU", RuntimeWarning)
        return torch.device("cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                         "from 0")
    if chosen.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        warnings.warn(f"device {device!r} requested but this torch has no Apple GPU (MPS); using the CPU",
                      RuntimeWarning)
        return torch.device("cpu")
    return chosen


def machine(device: Optional[torch.device] = None) -> dict:
    """The hardware and software of this run (CPU model from ``/proc/cpuinfo``, threads,
    versions, :func:`engine_version`; the GPU name when ``device`` is CUDA), for model cards
    and benchmark tables."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "engine": engine_version()}
    if device is not None:
        info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return info


def engine_version() -> str:
    """This engine's version and, run from a git checkout, its commit ("0.1.0, commit 1a2b3c4",
    "+ changes" when the engine's files differ from it), so that a figure names the code that
    made it."""
    from . import __version__

    here = Path(__file__).resolve().parent
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        if not git("ls-files", "--", "__init__.py"):  # installed into a folder a git checkout ignores
            return __version__
        commit = git("rev-parse", "--short=7", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", str(here.parent))
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}, commit {commit}{' + changes' if changed else ''}"


def machine_words(info: dict) -> str:
    """"<CPU model>, <n> thread(s), torch <version>, Python <version>, engine <version,
    commit>" of a :func:`machine` record, for model cards (a field the record lacks, as
    records made before the engine was recorded do, is left out)."""
    n = info.get("cpu_threads")
    return ", ".join([f"{info.get('cpu')}, {n} thread{'' if n == 1 else 's'}",
                      *(f"{word} {info[key]}" for word, key in (("torch", "torch"), ("Python", "python"),
                                                                ("engine", "engine")) if info.get(key))])


def _map_tensors(fn, tree):
    """``tree`` (tensors in nested tuples / lists, None allowed) with ``fn`` applied to each tensor."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(fn, item) for item in tree)
    if isinstance(tree, dict) or hasattr(tree, "_fields"):
        raise TypeError(f"CUDA graph arguments: tensors in nested tuples or lists only; got a {type(tree).__name__}")
    return tree


def _tensors(tree) -> list:
    found = []
    _map_tensors(found.append, tree)
    return found


class CudaGraphCall:
    """``fn(*args)`` on CUDA, recorded once as a CUDA graph and replayed.

    On a GPU a pass of many small kernels is bound by their launches, not their arithmetic;
    a replayed graph launches them all at once. The graph works on static copies of the
    arguments (tensors in nested tuples / lists, on one GPU; each call's of the first call's
    shapes): each call copies its arguments in, replays, and returns a copy of the output
    tensor. The graph reads the memory of everything ``fn`` uses (network weights): it is
    stale once those move (the caller's to keep it current). Capture fails with an exception
    for a function that synchronises with the CPU; the caller's stream is current again then.
    Run ``fn`` once eagerly before (cuDNN's and the allocator's first-call work); not thread-safe."""

    def __init__(self, fn: Callable, *args):
        self.device = _tensors(args)[0].device
        with torch.cuda.device(self.device):
            self.args = _map_tensors(torch.clone, args)
            caller = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(caller)
            with torch.cuda.stream(side):  # a warm-up off the caller's stream, as torch.cuda.graph asks
                fn(*self.args)
            caller.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.output = fn(*self.args)
            finally:  # a failed capture leaves its capture stream current
                torch.cuda.set_stream(caller)

    def __call__(self, *args) -> torch.Tensor:
        static, new = _tensors(self.args), _tensors(args)
        if [t.shape for t in static] != [t.shape for t in new]:
            raise ValueError("a captured CUDA graph replays only arguments of the shapes it was captured with")
        with torch.cuda.device(self.device):
            for s, t in zip(static, new):
                s.copy_(t)
            self.graph.replay()
            return self.output.clone()
