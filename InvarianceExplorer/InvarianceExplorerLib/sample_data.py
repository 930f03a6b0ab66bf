"""The bundled sample low-dose CT (``Resources/SampleData``): a newcomer and the Slicer self-test
have data without a network.

It is made by the project's own pipeline, deterministically: a procedural chest phantom
(:func:`~.phantom.chest_stack`, seed 3, three 2 mm slices of 512 x 512 pixels of 0.7 mm, the
pixel size the bundled denoisers were trained on)
scanned at quarter dose by :class:`~.lowdose.LowDoseSimulator`, stored as int16 HU in a
gzip NRRD. :data:`SAMPLE_CT` records its file name and SHA-256 (3D Slicer's SampleData
module checks it); ``python -m InvarianceExplorerLib.sample_data`` writes it again.
"""

from __future__ import annotations

from pathlib import Path

#: The sample CT: node/sample name, file under Resources/, SHA-256 of its bytes, how it was made.
SAMPLE_CT = {
    "name": "InvarianceExplorerChestLD",
    "file": "SampleData/InvarianceExplorerChestLD.nrrd",
    "sha256": "4c4ba00ed2bea9b78ef2867ecca66d1008314c663fdc3f9e7308524caa64fba3",
    "recipe": {"phantom_seed": 3, "slices": 3, "size": 512, "spacing_mm": 0.7, "slice_thickness_mm": 2.0,
               "dose": 0.25, "noise_seed": 3},
}


def resources_dir() -> Path:
    """``Resources/`` of the extension: next to the module when installed, else at the repository root."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "Resources", here.parents[1] / "Resources"]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def sample_ct_path() -> Path:
    """Where the bundled sample CT lies."""
    return resources_dir() / SAMPLE_CT["file"]


def write_sample_ct(path) -> str:
    """Simulate the sample CT (see the module docstring) and write it to ``path``; return the path."""
    import numpy as np

    from .io import write_nrrd
    from .lowdose import LowDoseSimulator
    from .phantom import chest_stack

    r = SAMPLE_CT["recipe"]
    phantom = chest_stack(r["phantom_seed"], r["slices"], r["size"], r["spacing_mm"], r["slice_thickness_mm"])
    simulator = LowDoseSimulator(r["size"], r["spacing_mm"])
    low = np.stack([simulator.simulate(phantom.hu[k], dose=r["dose"], seed=r["noise_seed"] + k).low_dose
                    for k in range(r["slices"])])
    hu = np.clip(np.round(low), -1024, 3071).astype(np.int16)
    return write_nrrd(phantom.to_ctimage(), path, array=hu)


if __name__ == "__main__":
    from .denoisers import sha256

    written = write_sample_ct(sample_ct_path())
    print(written, sha256(written))
