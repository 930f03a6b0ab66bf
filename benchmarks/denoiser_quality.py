"""Held-out quality of the bundled denoisers: the README table (low dose + each denoiser).

Denoises the whole slices of the test split of a simulated data set (patient-level split,
never used in training) with every denoiser bundled in Resources/Models/ and prints RMSE
(HU), PSNR, SSIM against full dose and the noise std in uniform phantom regions, with the
machine and the command.

    .venv/bin/python benchmarks/denoiser_quality.py --data data/sim512
    # also store the figures in each bundled model's metadata.json and MODEL_CARD.md:
    .venv/bin/python benchmarks/denoiser_quality.py --data data/sim512 --write
    # bundle a trained model folder (float16 if the held-out RMSE stays within 0.1 HU):
    .venv/bin/python benchmarks/denoiser_quality.py --data data/sim512 --ship checkpoints/cnn10/model
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def training_commands(metadata: dict, data: str, out: str, simulate: bool = True) -> list:
    """The CLI commands that make the data set and train the model of ``metadata``, preceded by
    those of the model folder it started from (``--init``), when that folder is still here
    (a bundled one's own record, which ends with its shipping)."""
    from InvarianceExplorerLib.train_denoiser import HYPERPARAMETERS

    t = metadata["training"]
    d, hp = t["data"], t["hyperparameters"]
    arch = metadata["architecture"]["name"]
    commands = []
    if simulate and d.get("kind") == "simulated":
        with open(Path(data) / "manifest.json") as f:
            manifest = json.load(f)
        commands.append(f"invariance-explorer data simulate --count {manifest['count']} --size {d['size']} "
                        f"--dose {d['dose']} --seed {d['seed']} --out {data}")
    start = t.get("initialised_from")
    if start and (Path(start["folder"]) / "metadata.json").is_file():
        with open(Path(start["folder"]) / "metadata.json") as f:
            previous = json.load(f)
        commands += ([c for c in previous["reproduce"] if not c.startswith("invariance-explorer data simulate")] if previous.get("reproduce")
                     else training_commands(previous, data, str(Path(start["folder"]).parent), simulate=False))
    defaults = json.loads(json.dumps(HYPERPARAMETERS[arch]))
    overrides = [f"--set {k}={json.dumps(v).replace(' ', '')}" for k, v in hp.items()
                 if k not in ("lr", "lr_decay", "lr_decay_start", "feature_network") and defaults.get(k) != v]
    commands.append(" ".join([
        f"invariance-explorer train denoiser --arch {arch} --data {data} --out {out} --epochs {t['epochs']}",
        f"--steps-per-epoch {t['steps_per_epoch']} --batch-size {t['batch_size']} --patch-size {metadata['patch_size']}",
        f"--lr {hp['lr']:g} --seed {t['seed']}"]
        + ([f"--lr-decay {hp['lr_decay']:g} --lr-decay-start {hp.get('lr_decay_start', 1)}"] if hp.get("lr_decay") else [])
        + overrides + ([f"--precision {t['precision']}"] if t.get("precision", "float32") != "float32" else [])
        + ([f"--val-slices {t['val_slices']}"] if t.get("val_slices", 32) != 32 else [])
        + ([f"--init {start['folder']}"] if start else [])
        + ([f"--feature-network {hp['feature_network']}"] if hp.get("feature_network") else [])))
    return commands


def main(argv=None) -> int:
    from InvarianceExplorerLib.denoisers import DENOISERS, bundled_models_dir, load_denoiser, read_metadata
    from InvarianceExplorerLib.devices import machine, machine_words
    from InvarianceExplorerLib.evaluation import held_out_quality, quality_table, ship_denoiser, write_held_out

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/sim512", help="simulated data set folder (default data/sim512)")
    parser.add_argument("--split", default="test", help="split to evaluate (default test)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many slices (default: all)")
    parser.add_argument("--write", action="store_true", help="store figures in the bundled models' metadata and cards")
    parser.add_argument("--ship", default=None, help="trained model folder to bundle into Resources/Models/<arch>")
    parser.add_argument("--note", action="append", default=[], help="note for the shipped model card (repeatable)")
    args = parser.parse_args(argv)
    words = list(argv or sys.argv[1:])
    words = [("NOTE" if k and words[k - 1] == "--note" else w) for k, w in enumerate(words)]  # notes go in the card
    command = "python benchmarks/denoiser_quality.py " + " ".join(shlex.quote(a) for a in words)
    started = time.perf_counter()

    if args.ship:
        metadata = read_metadata(args.ship)
        name = metadata["architecture"]["name"]
        out = str(Path(args.ship).parent)
        reproduce = training_commands(metadata, args.data, out) + [command]
        choice = ship_denoiser(args.ship, bundled_models_dir() / name, args.data, limit=args.limit,
                               reproduce=reproduce, notes=args.note)
        print(f"shipped {name} to {bundled_models_dir() / name} as {choice['dtype']} "
              f"(held-out RMSE {choice['rmse_hu']['float32']:.3f} HU float32, "
              f"{choice['rmse_hu']['float16']:.3f} HU float16)")

    models = {name: load_denoiser(name) for name in DENOISERS
              if (bundled_models_dir() / name / "metadata.json").is_file()}
    skipped = [name for name in DENOISERS if name not in models]
    result = held_out_quality(args.data, models, split=args.split, limit=args.limit)
    m = machine()
    print(f"Held-out denoiser quality: {result['split']} split of {args.data}, {result['slices']} whole slices "
          f"({result['patients']} patients); HU clipped to {result['metric_hu_range']} for RMSE/PSNR/SSIM; "
          f"noise std in eroded uniform phantom regions.\n")
    print(quality_table(result))
    print(f"\nmachine: {machine_words(m)}; "
          f"{time.perf_counter() - started:.0f} s")
    print(f"command: {command}")
    if skipped:
        print(f"not bundled yet: {', '.join(skipped)}")
    if args.write:
        for name in models:
            own = dict(result, figures={k: v for k, v in result["figures"].items()
                                        if k in ("low_dose", name, "full_dose")})
            previous = read_metadata(bundled_models_dir() / name)
            write_held_out(bundled_models_dir() / name, own, reproduce=previous.get("reproduce", ()),
                           notes=previous.get("notes", ()), weights_choice=previous.get("weights_choice"))
            print(f"wrote figures to {bundled_models_dir() / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
