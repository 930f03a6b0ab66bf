"""Benchmark: time and peak memory to sample 100 invariances of one 128x128 patch.

For each model folder (default: the bundled denoisers that have invariance models; with
``--random ARCH ...`` or when none has them, the default-size cVAE and cINN with random
weights beside a random-weight denoiser of that architecture, labelled so), on the CPU with
``--threads`` threads (2 by default) and on CUDA when present, split as in issue 4:

* per patch, once: f(x), the encoder, the decoder's conditioning and the flow's embedding;
* sampler: cINN reverse pass + decoder for the ``--count`` invariances (target: <= 1 s on
  2 CPU cores, <= 20 ms on one H100), as the sampler runs it
  (:meth:`~InvarianceExplorerLib.sampler.InvarianceSampler.draw`: on CUDA replayed from a
  captured graph; beside it in brackets, eager);
* denoiser: f(x~) on the ``--count`` invariances (the consistency check; as fast as torch
  runs that network here);
* the whole :meth:`~InvarianceExplorerLib.sampler.InvarianceSampler.sample` call, without
  consistency refinement, and with the model's (:class:`~InvarianceExplorerLib.sampler.Refinement`;
  :data:`~InvarianceExplorerLib.sampler.CHECKED_REFINEMENT` for a model without one: its
  gradient steps pass through f forward and backward, so they cost what f costs).

Times are the median of ``--repeats`` runs after one warm-up, in inference mode, batches of
``--batch-size`` (default: the sampler's for the device,
:data:`~InvarianceExplorerLib.sampler.BATCH_SIZE`). Each (model, device) runs in its own
process, so that the peak memory is its own: the peak resident set size of that process on
the CPU (includes Python, torch and the weights), ``torch.cuda.max_memory_allocated`` on
CUDA. Prints a Markdown table with the machine and the command.

    .venv/bin/python benchmarks/invariance_speed.py                 # bundled models
    .venv/bin/python benchmarks/invariance_speed.py --random cnn10 redcnn --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from InvarianceExplorerLib.denoisers import DENOISERS, Denoiser, build_denoiser, bundled_models_dir
from InvarianceExplorerLib.devices import machine
from InvarianceExplorerLib.inference import apply_network
from InvarianceExplorerLib.invariance_flow import InvarianceFlow
from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION
from InvarianceExplorerLib.representation import Representation
from InvarianceExplorerLib.sampler import BATCH_SIZE, CHECKED_REFINEMENT, InvarianceModels, InvarianceSampler, \
    default_batch_size, has_invariance_models, load_invariance_models

RANDOM = "random:"


def _models(name: str, device) -> InvarianceModels:
    if name.startswith(RANDOM):
        arch = name[len(RANDOM):]
        torch.manual_seed(0)
        denoiser = Denoiser(build_denoiser(arch).eval().requires_grad_(False), PAPER_NORMALIZATION,
                            {"architecture": {"name": arch}})
        rep, flow = Representation().eval().requires_grad_(False), InvarianceFlow().eval().requires_grad_(False)
        return InvarianceModels(denoiser, rep, flow).to(device)
    return load_invariance_models(name, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run, device, repeats: int) -> float:
    run()  # warm-up; on CUDA the sampler's first pass of a batch shape is eager,
    run()  # the second captures its graph
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, device_name: str, threads: int, count: int, batch_size: int, repeats: int) -> dict:
    """The figures of one model on one device (run in its own process by :func:`main`);
    ``batch_size`` 0: the sampler's default for the device."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    batch_size = batch_size or default_batch_size(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    models = _models(name, device)
    p = models.patch_size
    norm, rep, flow, network = models.denoiser.normalization, models.representation, models.flow, \
        models.denoiser.network
    rng = np.random.default_rng(0)
    x_hu = (rng.normal(40.0, 25.0, (p, p))).astype(np.float32)  # soft tissue with quarter-dose-like noise
    v = torch.randn(count, flow.z_dim, generator=torch.Generator().manual_seed(0))
    state = {}
    whole = InvarianceSampler(models, device=device)

    def once():
        with torch.inference_mode():
            x = norm.normalize(torch.from_numpy(x_hu)).to(device)[None, None]
            y = apply_network(network, x, tile_size=None)
            mean, _ = rep.encode(x, y)
            state.update(y=y, mean=mean, condition=rep.condition(y), embedding=flow.embed(y))

    def sampler():
        with torch.inference_mode():
            out = []
            for first in range(0, count, batch_size):
                out.append(whole.draw(v[first:first + batch_size].to(device), state["y"], state["condition"],
                                      state["embedding"]))
            state["x_tilde"] = torch.cat(out)

    def denoiser():
        with torch.inference_mode():
            for first in range(0, count, batch_size):
                apply_network(network, state["x_tilde"][first:first + batch_size], tile_size=None)

    setup_s = _timed(once, device, repeats)
    sampler_s = _timed(sampler, device, repeats)
    eager_s = None
    if device.type == "cuda":  # beside: without the captured graphs
        if not (whole.cuda_graphs and whole._graphs):
            raise RuntimeError("the sampler captured no CUDA graph (its warning says why)")
        whole.cuda_graphs = False
        eager_s = _timed(sampler, device, repeats)
        whole.cuda_graphs = True
    denoiser_s = _timed(denoiser, device, repeats)
    total_s = _timed(lambda: whole.sample(x_hu, count=count, seed=0, batch_size=batch_size, refinement=(0, 0)),
                     device, repeats)
    refinement = models.refinement or CHECKED_REFINEMENT
    refined_s = _timed(lambda: whole.sample(x_hu, count=count, seed=0, batch_size=batch_size,
                                            refinement=refinement), device, repeats)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        where = torch.cuda.get_device_name(device)
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        where = "cpu"
    return {"model": name, "device": where, "threads": threads if device.type == "cpu" else None,
            "patch": p, "count": count, "batch_size": batch_size, "setup_s": setup_s, "sampler_s": sampler_s,
            "sampler_eager_s": eager_s, "denoiser_s": denoiser_s, "total_s": total_s, "refinement": refinement.as_dict(),
            "refined_s": refined_s, "peak_mb": peak_mb,
            "memory": "CUDA max allocated" if device.type == "cuda" else "process peak RSS"}


def default_models() -> list:
    folder = bundled_models_dir()
    return [str(folder / arch) for arch in DENOISERS
            if (folder / arch).is_dir() and has_invariance_models(folder / arch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="model folders with invariance models (default: bundled ones)")
    parser.add_argument("--random", nargs="+", choices=list(DENOISERS), default=None,
                        help="also benchmark default-size random-weight models beside these denoisers")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="invariances per forward pass (default: the sampler's for the device, "
                             + ", ".join(f"{n} on {d}" for d, n in BATCH_SIZE.items()) + ")")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when present")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.threads, args.count, args.batch_size, args.repeats)))
        return
    models = list(args.models) or default_models()
    randoms = args.random or ([] if models else list(DENOISERS))
    if not models and not args.random:
        print("no bundled model has invariance models yet: benchmarking random-weight models of the default sizes")
    models += [RANDOM + arch for arch in randoms]
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows, failed = [], 0
    for name in models:
        for device in devices:
            command = [sys.executable, __file__, "--one", name, device, "--threads", str(args.threads),
                       "--count", str(args.count), "--batch-size", str(args.batch_size), "--repeats",
                       str(args.repeats)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(f"{name} on {device} failed (exit {done.returncode}):\n{done.stderr}", file=sys.stderr)
                failed += 1
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    m = machine()
    print(f"machine: {m['cpu']}, torch {m['torch']}, Python {m['python']}, engine {m['engine']}"  # threads per row
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print("command: " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    print(f"{args.count} invariances of one patch, median of {args.repeats} runs")
    print()
    print("| model | device | threads | patch | batch | once per patch (ms) | sampler: cINN + decoder (s) | "
          "denoiser f(x~) (s) | whole sample() (s) | with a consistency refinement (s) | "
          "peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = Path(r["model"]).name if not r["model"].startswith(RANDOM) else r["model"] + " (random weights)"
        print(f"| {label} | {r['device']} | {r['threads'] or '–'} | {r['patch']}² | {r['batch_size']} | "
              f"{1000 * r['setup_s']:.1f} | "
              f"{r['sampler_s']:.3f}"
              + (f" ({r['sampler_eager_s']:.3f} eager)" if r.get("sampler_eager_s") is not None else "")
              + f" | {r['denoiser_s']:.3f} | {r['total_s']:.3f} | "
              + f"{r['refined_s']:.3f} ({r['refinement']['centre']} + {r['refinement']['sample']} steps)"
              + f" | {r['peak_mb']:.0f} "
              f"({r['memory']}) |")
    if failed:
        sys.exit(f"{failed} of {failed + len(rows)} measurements failed (above)")


if __name__ == "__main__":
    main()
