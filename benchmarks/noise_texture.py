"""Store the noise texture of a model folder's training data in its metadata.

Model folders trained by ``invariance-explorer train denoiser`` carry
``metadata["noise_texture"]`` (:func:`~InvarianceExplorerLib.training.data_noise_texture`:
the NPS shape of the training pairs' low- minus full-dose differences), from which method A
estimates the rescan floor of refined invariances when no scans are at hand
(:func:`~InvarianceExplorerLib.analysis.estimated_scan_floor`). Folders trained before that
get it from this script, measured on the data set they were trained on (checked against
``metadata["training"]["data"]``), and their model card is rewritten.

    .venv/bin/python benchmarks/noise_texture.py Resources/Models/{cnn10,redcnn,wganvgg,dugan} --data data/sim512
"""

from __future__ import annotations

import argparse

from InvarianceExplorerLib.datasets import open_source
from InvarianceExplorerLib.denoisers import read_metadata, resolve_model_folder, write_metadata
from InvarianceExplorerLib.evaluation import MODEL_CARD, model_card
from InvarianceExplorerLib.training import data_noise_texture, describe_data

#: Entries of ``training.data`` that must match the data set given.
MATCHED = ("kind", "pairs", "size", "pixel_spacing_mm", "dose", "seed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (or bundled names)")
    parser.add_argument("--data", required=True, help="the data set the denoiser was trained on (its path here)")
    args = parser.parse_args()
    source = open_source(args.data)
    here = describe_data(source, args.data)
    texture = data_noise_texture(source)
    if texture is None:
        raise SystemExit(f"{args.data} has no full-dose images: no noise to measure")
    for model in args.models:
        folder = resolve_model_folder(model)
        metadata = read_metadata(folder)
        trained = (metadata.get("training") or {}).get("data") or {}
        differing = [k for k in MATCHED if trained.get(k) != here.get(k)]
        if differing:
            raise SystemExit(f"{folder} was trained on other data than {args.data} (differing: "
                             + ", ".join(f"{k} {trained.get(k)!r} vs {here.get(k)!r}" for k in differing) + ")")
        metadata["noise_texture"] = texture
        write_metadata(folder, metadata)
        (folder / MODEL_CARD).write_text(model_card(read_metadata(folder)))
        print(f"{folder}: noise texture from {texture['measured_on']}")


if __name__ == "__main__":
    main()
