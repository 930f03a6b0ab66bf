"""Could the sampler re-apply f in bfloat16 on a CPU that supports it? Speed against fidelity.

Issue 4 allows bfloat16 for f(x~) (the consistency check, f's own cost: it dominates
``sample()`` for RED-CNN and DU-GAN) only "where the CPU supports it and the consistency
figures still hold". For each bundled model this script samples ``--count`` invariances of
128² patches of the bundled sample CT (refined as the model folder says, and unrefined), then
applies f to them and to x in float32 and under ``torch.autocast`` in bfloat16, in the
sampler's CPU batches, channels-last, inference mode, and prints per model:

* seconds for f over the ``--count`` invariances in each precision (median of ``--repeats``
  runs after a warm-up, first patch) and the speed-up;
* the rounding error ``mean|f_bf16(x~) - f_fp32(x~)|`` (HU) against the sampler's
  ``mean|f(x~) - f(x)|``, the numerator of C, which it would add to;
* C = mean|f(x~) - f(x)| / mean|x~ - x| with f in float32 and with f in bfloat16 (f(x) too).

    .venv/bin/python benchmarks/denoiser_precision.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> None:
    from InvarianceExplorerLib.devices import machine, machine_words
    from InvarianceExplorerLib.io import read_image
    from InvarianceExplorerLib.sample_data import sample_ct_path
    from InvarianceExplorerLib.sampler import BATCH_SIZE, InvarianceSampler
    from invariance_speed import _timed  # median of repeats after a warm-up (this folder)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=["cnn10", "wganvgg", "redcnn", "dugan"])
    parser.add_argument("--centers", nargs="+", default=["368,283,1", "256,256,1", "150,300,1", "300,150,1"],
                        metavar="I,J,K", help="patch centres in the sample CT (voxels)")
    parser.add_argument("--count", type=int, default=100, help="invariances per patch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = read_image(sample_ct_path())
    centers = [tuple(int(v) for v in c.split(",")) for c in args.centers]
    batch = BATCH_SIZE["cpu"]
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    m = machine()
    print(f"machine: {machine_words(m)}; bfloat16 in oneDNN: {'yes' if bf16 else 'no'}")
    print("command: " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]))
    print(f"{len(centers)} patches of the sample CT, {args.count} invariances each, f in batches of {batch}")
    print()
    print("| model | samples | f float32 (s) | f bfloat16 (s) | speed-up | mean\\|f_bf16(x~) − f_fp32(x~)\\| (HU) "
          "| mean\\|f(x~) − f(x)\\| (HU) | C float32 | C bfloat16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        sampler = InvarianceSampler(name, device="cpu")
        norm, network = sampler.models.denoiser.normalization, sampler.models.denoiser.network

        def f(images: np.ndarray, half: bool) -> np.ndarray:
            x = norm.normalize(torch.from_numpy(images))[:, None].contiguous(memory_format=torch.channels_last)
            out = []
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                for first in range(0, x.shape[0], batch):
                    out.append(network(x[first:first + batch]).float())
            return norm.denormalize(torch.cat(out)[:, 0]).numpy()

        for label, refinement in (("refined", None), ("unrefined", (0, 0))):
            rows = []
            for n, center in enumerate(centers):
                patch = sampler.crop(image, center).array
                result = sampler.sample(patch, count=args.count, seed=n, refinement=refinement)
                x_tilde, x = result.invariances, result.x[None]
                outputs = {half: (f(x_tilde, half), f(x, half)[0]) for half in (False, True)}
                change = np.abs(x_tilde - x).mean()
                rows.append(dict(
                    rounding=np.abs(outputs[True][0] - outputs[False][0]).mean(),
                    output_change=np.abs(outputs[False][0] - outputs[False][1]).mean(),
                    c32=np.abs(outputs[False][0] - outputs[False][1]).mean() / change,
                    c16=np.abs(outputs[True][0] - outputs[True][1]).mean() / change))
                if n == 0:
                    seconds = {half: _timed(lambda: f(x_tilde, half), torch.device("cpu"), args.repeats)
                               for half in (False, True)}
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            print(f"| {name} | {label} | {seconds[False]:.2f} | {seconds[True]:.2f} | "
                  f"{seconds[False] / seconds[True]:.1f}x | {mean['rounding']:.2f} | {mean['output_change']:.2f} | "
                  f"{mean['c32']:.3f} | {mean['c16']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
