"""An imported denoiser (class file + state dict, as ``fit --class`` takes it) for the tests of
trusted code: an identity 3 x 3 convolution, which passes the denoiser checks, and a copy of
its model folder whose code was changed (with checksums to match, as a sender would) to
leave a marker file when it runs."""

from __future__ import annotations

from pathlib import Path

import torch

CODE = '''import torch
import torch.nn as nn


class Net(nn.Conv2d):
    def __init__(self):
        super().__init__(1, 1, 3, padding=1)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[0, 0, 1, 1] = 1.0
            self.bias.zero_()
'''


def imported_folder(tmp_path: Path) -> Path:
    """The model folder of the identity network, imported (so trusted on this machine)."""
    from InvarianceExplorerLib.custom_denoisers import import_denoiser
    from InvarianceExplorerLib.normalization import PAPER_NORMALIZATION

    code = tmp_path / "net.py"
    code.write_text(CODE)
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0
    torch.save({"weight": weight, "bias": torch.zeros(1)}, tmp_path / "net.pt")
    return import_denoiser(tmp_path / "net.pt", tmp_path / "imported", normalization=PAPER_NORMALIZATION,
                           class_path=f"{code}:Net")


def changed_copy(folder: Path, destination: Path, marker: Path) -> Path:
    """A copy of ``folder`` whose network.py also creates ``marker`` when it runs, its
    checksum updated in metadata.json: a folder no one here trusted."""
    from InvarianceExplorerLib.denoisers import copy_model_folder, read_metadata, sha256, write_metadata

    copy = copy_model_folder(folder, destination)
    (copy / "network.py").write_text(CODE + f"\nopen({str(marker)!r}, 'w').close()\n")
    metadata = read_metadata(copy)
    metadata["architecture"]["files"]["network"]["sha256"] = sha256(copy / "network.py")
    write_metadata(copy, metadata)
    return copy
