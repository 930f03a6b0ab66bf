"""The four LDCT denoisers under study, the networks that train them, and their model folders.

Denoisers (all fully convolutional, stride 1, images in network units of
:class:`~.normalization.HUNormalization`, ``(N, 1, H, W)`` in and out, any ``H, W``):

* :class:`CNN10` - Chen et al., "Low-dose CT via convolutional neural network", Biomed.
  Opt. Express 8(2), 2017: three convolutions.
* :class:`REDCNN` - Chen et al., "Low-dose CT with a residual encoder-decoder
  convolutional neural network", IEEE TMI 36(12), 2017.
* :class:`WGANVGG` - the generator of Yang et al., "Low-dose CT image denoising using a
  generative adversarial network with Wasserstein distance and perceptual loss", IEEE TMI
  37(6), 2018.
* DU-GAN - Huang et al., "DU-GAN: generative adversarial networks with dual-domain
  U-Net-based discriminators for low-dose CT denoising", IEEE TIM 71, 2022: a RED-CNN
  generator, so ``DENOISERS["dugan"]`` is :class:`REDCNN`.

Networks used only in training (:mod:`.train_denoiser`): :class:`WGANCritic`,
:class:`FeatureNetwork` (our replacement for the ImageNet VGG-19 of the perceptual loss,
which cannot be downloaded here: a small VGG-style network trained to segment the phantom's
tissue labels) and :class:`UNetDiscriminator` (DU-GAN's two discriminators). Layer sizes
follow the papers and the reference implementation eeulig/ldct-benchmark.

A model folder holds ``metadata.json`` and the weights as safetensors files, each with its
SHA-256 in the metadata; :func:`load_denoiser` checks them and never unpickles anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from .io import read_json_object, write_json, written_file
from .normalization import HUNormalization

MODEL_FORMAT = "invariance-explorer/denoiser"
MODEL_VERSION = 1
METADATA = "metadata.json"
WEIGHTS = "denoiser.safetensors"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: ``architecture.name`` of a user's own denoiser (:mod:`.custom_denoisers`).
CUSTOM = "custom"


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: Optional[int] = None,
          act=None, transposed: bool = False) -> Convolution:
    """A 2D (transposed) convolution with bias, followed by ``act`` (none if None); ``padding``
    defaults to "same" (``(kernel_size - 1) // 2``)."""
    padding = (kernel_size - 1) // 2 if padding is None else padding
    return Convolution(2, in_channels, out_channels, strides=stride, kernel_size=kernel_size, padding=padding,
                       output_padding=0 if transposed else None, is_transposed=transposed,
                       act=act, norm=None, conv_only=act is None)


# ----------------------------------------------------------------------------- denoisers


class CNN10(nn.Sequential):
    """CNN-10: conv 9x9/64, ReLU, conv 3x3/32, ReLU, conv 5x5/1, zero-padded to keep the size
    (receptive field 15 x 15 pixels)."""

    def __init__(self):
        super().__init__(_conv(1, 64, 9, act="relu"), _conv(64, 32, 3, act="relu"), _conv(32, 1, 5))


class REDCNN(nn.Module):
    """RED-CNN: five 5x5 convolutions (no padding, each shrinks the image by 4 pixels) and
    five 5x5 transposed convolutions (each grows it back by 4), stride 1, ``channels``
    feature maps, ReLU after each layer but the last (the data are mean/std normalised, so
    the output may be negative, as in ldct-benchmark). Three residual shortcuts, as
    published: input to output, conv2 to deconv3 and conv4 to deconv1, added before the
    ReLU. Receptive field 41 x 41 pixels.

    Args:
        channels: feature maps of every hidden layer (96 in the paper).
    """

    def __init__(self, channels: int = 96):
        super().__init__()
        c = channels
        self.encoder = nn.ModuleList([_conv(1 if k == 0 else c, c, 5, padding=0) for k in range(5)])
        self.decoder = nn.ModuleList([_conv(c, 1 if k == 4 else c, 5, padding=0, transposed=True) for k in range(5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = []  # outputs of conv1..conv5 (after ReLU)
        out = x
        for layer in self.encoder:
            out = F.relu(layer(out))
            conv.append(out)
        deconv = self.decoder
        out = F.relu(deconv[0](out) + conv[3])
        out = F.relu(deconv[1](out))
        out = F.relu(deconv[2](out) + conv[1])
        out = F.relu(deconv[3](out))
        return deconv[4](out) + x


class WGANVGG(nn.Sequential):
    """The WGAN-VGG generator: eight 3x3 convolutions with 32 feature maps (the last to one
    channel), ReLU after all but the last, zero-padded to keep the size (receptive field
    17 x 17 pixels)."""

    def __init__(self):
        super().__init__(*[_conv(1 if k == 0 else 32, 32, 3, act="relu") for k in range(7)], _conv(32, 1, 3))


#: The denoisers by name: ``arch -> class``; constructor arguments go in the model metadata.
DENOISERS = {"cnn10": CNN10, "redcnn": REDCNN, "wganvgg": WGANVGG, "dugan": REDCNN}


def build_denoiser(arch: str, **arguments) -> nn.Module:
    """A new (untrained) denoiser of architecture ``arch`` (a key of :data:`DENOISERS`)."""
    if arch not in DENOISERS:
        raise ValueError(f"unknown denoiser architecture {arch!r}; choose one of {', '.join(DENOISERS)}")
    return DENOISERS[arch](**arguments)


def receptive_field(model) -> int:
    """Side length in pixels of the square of input pixels that one output pixel depends on.

    A network (or :class:`Denoiser`) may declare it as a ``receptive_field`` attribute;
    otherwise it is computed as ``1 + sum((kernel - 1) * dilation)`` over all its
    convolutions, which is exact for stride-1 networks whose longest path passes through
    every convolution (all four denoisers here).
    """
    network = getattr(model, "network", model)
    declared = getattr(network, "receptive_field", None)
    if isinstance(declared, int):
        return declared
    size = 1
    for m in network.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            if any(s != 1 for s in m.stride):
                raise ValueError(f"cannot compute the receptive field of {type(network).__name__}: it has strided "
                                 "convolutions; declare it as a 'receptive_field' attribute")
            size += max((k - 1) * d for k, d in zip(m.kernel_size, m.dilation))
    return size


# ----------------------------------------------------------------------------- training companions


class WGANCritic(nn.Module):
    """The WGAN-VGG critic (Yang et al. 2018): six 3x3 convolutions without padding
    (64, 64, 128, 128, 256, 256 feature maps, strides 1, 2, 1, 2, 1, 2, LeakyReLU), a fully
    connected layer of 1024 units (LeakyReLU) and one output, the Wasserstein critic value.
    The fully connected layer fixes the input size to ``patch_size`` x ``patch_size``.

    The defaults are the published critic. The representation's conditional critic
    (:mod:`.train_invariance`) sees ``[image, f(x)]`` (``in_channels=2``) and is narrower
    (``widths``, ``hidden``) to keep CPU training affordable.

    Args:
        patch_size: side of the square input in pixels (at least 24).
        in_channels: image channels of the input.
        widths: feature maps of the six convolutions.
        hidden: units of the fully connected layer.
    """

    def __init__(self, patch_size: int, in_channels: int = 1, widths: Sequence[int] = (64, 64, 128, 128, 256, 256),
                 hidden: int = 1024):
        super().__init__()
        widths, strides = tuple(int(w) for w in widths), (1, 2, 1, 2, 1, 2)
        if len(widths) != len(strides):
            raise ValueError(f"the WGAN critic has {len(strides)} convolutions; got widths {widths}")
        size = patch_size
        for s in strides:
            size = (size - 3) // s + 1
        if size < 1:
            raise ValueError(f"the WGAN critic needs patches of at least 24 pixels; got {patch_size}")
        self.features = nn.Sequential(*[_conv(c_in, c_out, 3, stride=s, padding=0, act="leakyrelu")
                                        for c_in, c_out, s in zip((in_channels,) + widths[:-1], widths, strides)])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(widths[-1] * size * size, hidden), nn.LeakyReLU(),
                                  nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class FeatureNetwork(nn.Module):
    """A small VGG-style network whose deep features define WGAN-VGG's perceptual loss.

    Deviation from Yang et al. (who use an ImageNet-trained VGG-19, features of its 16th
    convolution): pretrained weights cannot be downloaded here, so this network is trained
    on our own CT data to segment the phantom's tissue labels (:class:`~.phantom.Label`)
    from low- and full-dose patches, which makes its features describe anatomy.

    Stages of two 3x3 convolutions with ReLU and ``widths`` feature maps, 2x2 max pooling
    between stages; :meth:`features` returns the last convolution's output before its ReLU
    (1/4 resolution with three stages), :meth:`forward` the label logits at full resolution
    (1x1 convolution, bilinear upsampling).

    Args:
        n_labels: number of tissue classes.
        widths: feature maps per stage.
    """

    def __init__(self, n_labels: int = 12, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers, c_in = [], 1
        for k, width in enumerate(widths):
            if k:
                layers.append(nn.MaxPool2d(2))
            layers += [_conv(c_in, width, 3, act="relu"), _conv(width, width, 3)]
            if k < len(widths) - 1:
                layers.append(nn.ReLU())
            c_in = width
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(c_in, n_labels, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(F.relu(self.features(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _leaky(slope: float = 0.2):
    return ("leakyrelu", {"negative_slope": slope})


class _DownBlock(nn.Module):
    """U-Net encoder stage: two 3x3 convolutions (the skip output), then a 4x4 stride-2
    convolution (unless ``down`` is False), plus a 1x1 (strided) shortcut of the input."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.shortcut = _conv(c_in, c_out, 1, stride=2 if down else 1)
        self.convs = nn.Sequential(_conv(c_in, c_out, 3, act=_leaky()), _conv(c_out, c_out, 3, act=_leaky()))
        self.down = _conv(c_out, c_out, 4, stride=2) if down else None

    def forward(self, x):
        skip = self.convs(x)
        shortcut = self.shortcut(x)
        out = skip if self.down is None else _pad_to(self.down(skip), shortcut)
        return out + shortcut, skip


class _UpBlock(nn.Module):
    """U-Net decoder stage: bilinear 2x upsampling, two 3x3 convolutions of [upsampled, skip],
    plus a 1x1 shortcut of the upsampled input."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.shortcut = _conv(c_in, c_out, 1)
        self.convs = nn.Sequential(_conv(2 * c_in, c_out, 3, act=_leaky()), _conv(c_out, c_out, 3, act=_leaky()))

    def forward(self, x, skip):
        x = _pad_to(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), skip)
        return self.convs(torch.cat((x, skip), dim=1)) + self.shortcut(x)


def _pad_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` (centred) to the spatial size of ``like`` (odd sizes in a U-Net)."""
    dy, dx = like.shape[-2] - x.shape[-2], like.shape[-1] - x.shape[-1]
    return F.pad(x, (dx // 2, dx - dx // 2, dy // 2, dy - dy // 2)) if dy or dx else x


class UNetDiscriminator(nn.Module):
    """DU-GAN's U-Net discriminator (Huang et al. 2022, sizes from ldct-benchmark).

    ``levels + 1`` encoder stages (feature maps ``channels * 2**k``, at most 512; the last
    stage keeps the previous width and does not downsample), a residual bottleneck of two
    3x3 convolutions, and ``levels`` decoder stages back to full resolution. LeakyReLU 0.2;
    spectral normalisation on every convolution but the first and the output ones.

    ``forward`` returns ``(encoder, decoder)``: the global real/fake score per image
    ``(N,)`` (global average pooling of the bottleneck, linear layer) and the per-pixel
    score map ``(N, 1, H, W)``.

    Args:
        levels: down-sampling steps (6 in DU-GAN: a 128-pixel patch becomes 2 x 2).
        channels: feature maps of the first stage (64 in DU-GAN).
    """

    def __init__(self, levels: int = 6, channels: int = 64):
        super().__init__()
        widths = [1] + [min(channels * 2 ** k, 512) for k in range(levels + 1)]
        widths[-1] = widths[-2]
        pairs = list(zip(widths[:-1], widths[1:]))
        self.encoder = nn.ModuleList([_DownBlock(a, b, down=k < levels) for k, (a, b) in enumerate(pairs)])
        self.bottleneck = nn.Sequential(_conv(widths[-1], widths[-1], 3, act=_leaky()),
                                        _conv(widths[-1], widths[-1], 3, act=_leaky()))
        self.global_head = nn.Sequential(nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                         nn.Linear(widths[-1], 1))
        self.decoder = nn.ModuleList([_UpBlock(b, a) for a, b in reversed(pairs[:-1])])
        self.pixel_head = nn.Conv2d(1, 1, 1)
        for m in list(self.modules()):
            if isinstance(m, nn.Conv2d) and m.in_channels > 4 and m.out_channels != 1:
                nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor):
        skips = []
        for block in self.encoder:
            x, skip = block(x)
            skips.append(skip)
        x = self.bottleneck(x) + x
        encoder = self.global_head(x)[:, 0]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = block(x, skip)
        return encoder, self.pixel_head(x)


# ----------------------------------------------------------------------------- model folders


@dataclass
class Denoiser:
    """A trained denoiser f as loaded from its model folder.

    Attributes:
        network: the torch module, in eval mode with frozen weights; maps ``(N, 1, H, W)``
            images in network units to denoised images in network units.
        normalization: the HU <-> network units map it was trained with.
        metadata: the folder's ``metadata.json`` (architecture, training, figures).
        folder: where it was loaded from.
    """

    network: nn.Module
    normalization: HUNormalization
    metadata: dict
    folder: Optional[Path] = None

    @property
    def arch(self) -> str:
        return self.metadata["architecture"]["name"]

    @property
    def use(self) -> str:
        """"patch" (a local network: large slices may be tiled) or "full-image" (whole slices only)."""
        return self.metadata["architecture"].get("use", "patch")

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.network)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) for whole patches or slices ``x`` ``(N, 1, H, W)`` in network units, untiled
        (:func:`~.inference.apply_network`: a ``ValueError`` for images smaller than the
        receptive field); gradients flow if enabled by the caller."""
        from .inference import apply_network

        return apply_network(self.network, x, tile_size=None)

    def to(self, device) -> "Denoiser":
        """Move the network to ``device``. A bundled architecture is laid out channels-last,
        in which its convolutions run faster on a CPU (README, speed table of
        ``benchmarks/invariance_speed.py``) with the same outputs up to float rounding; your own
        network keeps its layout (its code may assume contiguous tensors)."""
        if self.arch in DENOISERS:
            self.network.to(device, memory_format=torch.channels_last)
        else:
            self.network.to(device)
        return self


def bundled_models_dir() -> Path:
    """``Resources/Models`` of the extension: next to the module when installed in 3D Slicer,
    at the repository root in a source checkout."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "Resources" / "Models", here.parents[1] / "Resources" / "Models"]
    return next((c for c in candidates if c.is_dir()), candidates[-1])


def resolve_model_folder(folder_or_name) -> Path:
    """The model folder for a path or for the name of a bundled denoiser (a key of
    :data:`DENOISERS`, found in ``Resources/Models/<name>/``). A bundled name is always the
    bundled folder, whatever the working folder holds (a folder of that name is ``./cnn10``)."""
    name = str(folder_or_name)
    path = Path(folder_or_name)
    if path.is_dir() and name not in DENOISERS:
        return path.absolute()  # resolved again (read_metadata), it stays this folder
    if name in DENOISERS:
        bundled = bundled_models_dir() / name
        if (bundled / METADATA).is_file():
            return bundled
        raise ValueError(f"the bundled weights of {name} are missing from {bundled} (an incomplete copy of the "
                         f"extension: reinstall it or restore that folder), or give a model folder of your own "
                         f"(`invariance-explorer train denoiser --arch {name} --data DIR --out OUT` writes OUT/model)")
    raise ValueError(f"{name}: neither a model folder nor a bundled denoiser name ({', '.join(DENOISERS)})")


def sha256(path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_weights(module: nn.Module, path, dtype: str = "float32") -> dict:
    """Write ``module``'s state dict to the safetensors file ``path`` (floating-point tensors
    stored as ``dtype``: "float32" or "float16"); return its ``{file, dtype, sha256}`` record."""
    from safetensors.torch import save_file

    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights dtype is one of {', '.join(WEIGHT_DTYPES)}; got {dtype!r}")
    tensors = {k: (v.to(WEIGHT_DTYPES[dtype]) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in module.state_dict().items()}
    path = Path(path)
    with written_file(path) as temporary:
        save_file(tensors, str(temporary))
    return {"file": path.name, "dtype": dtype, "sha256": sha256(path)}


def folder_file(folder, record) -> Path:
    """The file a record of ``metadata.json`` names (``{"file": ..., "sha256": ...}``), which
    must lie inside ``folder`` (a relative path without ``..``, not a symbolic link);
    ``ValueError`` otherwise, or when the record lacks a field."""
    if not isinstance(record, dict) or not isinstance(record.get("file"), str) or \
            not isinstance(record.get("sha256"), str):
        raise ValueError(f"{Path(folder) / METADATA}: a file record lacks its 'file' or 'sha256' ({record!r:.80}); "
                         "the model folder is damaged: copy it again from where it was made")
    name = Path(record["file"])
    path = Path(folder) / name
    if name.is_absolute() or ".." in name.parts or not name.parts or any(
            (Path(folder).joinpath(*name.parts[:k + 1])).is_symlink() for k in range(len(name.parts))):
        raise ValueError(f"{Path(folder) / METADATA}: the file {record['file']!r} does not lie inside the model "
                         "folder (an absolute path, '..' or a symbolic link); a model folder keeps its own files")
    return path


def verify_weights(folder, record: dict) -> Path:
    """The weight file of ``record`` (from :func:`save_weights`) in ``folder``, after checking
    that it exists and matches its SHA-256; ``ValueError`` naming the file otherwise."""
    path = folder_file(folder, record)
    if not path.is_file():
        raise ValueError(f"{path}: weight file listed in {METADATA} is missing; restore the model folder")
    actual = sha256(path)
    if actual != record["sha256"]:
        raise ValueError(f"{path}: SHA-256 checksum {actual[:16]}... does not match {record['sha256'][:16]}... "
                         f"recorded in {METADATA}; the file is damaged or was replaced, restore the model folder")
    return path


def load_weights(module: nn.Module, folder, record: dict) -> nn.Module:
    """Load the checked (:func:`verify_weights`) safetensors file of ``record`` into
    ``module``; floating-point values are cast to the module's dtype."""
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(verify_weights(folder, record))))
    return module


def load_network(build: Callable[..., nn.Module], arguments, folder, record: dict) -> nn.Module:
    """``build(**arguments)`` (constructor arguments from ``metadata.json``) with the weights
    of the checked safetensors file of ``record``. The network is first built without memory
    (torch's meta device) and its tensors' names and shapes compared with the file's, so
    arguments that do not build it, or build another network than the file holds (a damaged
    or altered folder: any size would be allocated), raise ``ValueError`` first."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = verify_weights(folder, record)
    damaged = "the model folder is damaged: copy it again from where it was made"
    try:
        if not isinstance(arguments, dict):
            raise TypeError(f"a JSON object is needed, not {type(arguments).__name__}")
        with torch.device("meta"), _rng_kept():
            wanted = {k: tuple(v.shape) for k, v in build(**arguments).state_dict().items()}
    except (TypeError, ValueError, KeyError, IndexError, AssertionError) as exc:
        raise ValueError(f"{Path(folder) / METADATA}: the arguments {json.dumps(arguments)[:120]} do not build "
                         f"the network of {path.name} ({' '.join(str(exc).split())[:160]}); {damaged}") from None
    with safe_open(str(path), "pt") as stored_file:
        stored = {k: tuple(stored_file.get_slice(k).get_shape()) for k in stored_file.keys()}
    if stored != wanted:
        name = sorted(set(stored) ^ set(wanted)) or sorted(k for k in stored if stored[k] != wanted[k])
        k = name[0]
        raise ValueError(f"{path}: its tensors do not fit the network {METADATA} describes ({len(name)} differ, "
                         f"e.g. {k}: {stored.get(k, 'absent')} in the file, {wanted.get(k, 'absent')} built); "
                         f"{damaged}")
    with _rng_kept():  # a network's random initialisation, replaced by the file's weights
        network = build(**arguments).float()  # float32 whatever torch's default dtype
    network.load_state_dict(load_file(str(path)))
    return network


@contextlib.contextmanager
def _rng_kept():
    """Leave torch's and numpy's global random state as it was (building a network draws
    its initial weights, FrEIA's permutations draw from numpy): loading a model must not
    change the random numbers of the caller's program."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    np.random.set_state(state)


def copy_model_folder(source: Path, destination: Path) -> Path:
    """Copy a model folder (weights, metadata, card, an imported denoiser's ``bundle/``) to
    ``destination``, replacing the model folder there (a folder copied onto itself is left as
    it is); hidden files are left out. ``ValueError`` when the source holds a symbolic link
    (its target would be copied in) or the destination holds files but no model folder.
    Returns ``destination``."""
    links = [p for p in Path(source).rglob("*") if p.is_symlink()]
    if links:
        raise ValueError(f"{links[0]}: a symbolic link in the model folder {source}; a model folder is copied with "
                         "its own files only: replace the link by the file")
    if destination.is_dir() and any(destination.iterdir()) and not (destination / METADATA).is_file():
        raise ValueError(f"{destination} holds files but no model folder; choose an empty or new folder")
    destination.mkdir(parents=True, exist_ok=True)
    if source.resolve() != destination.resolve():
        for old in destination.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        for f in source.iterdir():
            if f.name.startswith("."):
                continue
            if f.is_dir():
                shutil.copytree(f, destination / f.name, ignore=shutil.ignore_patterns(".*"))
            else:
                shutil.copy2(f, destination / f.name)
    return destination


def save_denoiser(folder, network: nn.Module, arch: str, arguments: dict, normalization: HUNormalization,
                  metadata: Optional[dict] = None, *, dtype: str = "float32",
                  extra: Optional[Dict[str, nn.Module]] = None) -> Path:
    """Write a model folder: ``denoiser.safetensors`` (and ``<name>.safetensors`` for each
    module of ``extra``, e.g. WGAN-VGG's feature network), then ``metadata.json`` holding
    the architecture and its constructor ``arguments``, the normalisation, the weight files
    with their dtype and SHA-256, and ``metadata`` (training, figures). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {"denoiser": save_weights(network, folder / WEIGHTS, dtype)}
    for name, module in (extra or {}).items():
        weights[name] = save_weights(module, folder / f"{name}.safetensors", dtype)
    record = {"format": MODEL_FORMAT, "version": MODEL_VERSION,
              "architecture": {"name": arch, "class": DENOISERS[arch].__name__, "arguments": dict(arguments),
                               "receptive_field": receptive_field(network)},
              "normalization": normalization.to_dict(), "weights": weights, **(metadata or {})}
    write_metadata(folder, record)
    return folder


def write_metadata(folder, record: dict) -> Path:
    """Write ``record`` as the ``metadata.json`` of ``folder`` atomically (whole or not at all)."""
    return write_json(Path(folder) / METADATA, record)


def read_metadata(folder_or_name) -> dict:
    """The ``metadata.json`` of a model folder or bundled denoiser, checked for its format."""
    folder = resolve_model_folder(folder_or_name)
    path = folder / METADATA
    if not path.is_file():
        raise ValueError(f"{folder}: not a denoiser model folder (no {METADATA})")
    metadata = read_json_object(path, "the model folder is damaged: copy it again from where it was made")
    if metadata.get("format") != MODEL_FORMAT or metadata.get("architecture", {}).get("name") not in (*DENOISERS,
                                                                                                       CUSTOM):
        raise ValueError(f"{path}: not an InvarianceExplorer denoiser (format {metadata.get('format')!r}, "
                         f"architecture {metadata.get('architecture', {}).get('name')!r})")
    if metadata.get("version") != MODEL_VERSION:
        from . import __version__

        made = metadata.get("engine_version") or "an unknown version"
        raise ValueError(f"{folder}: this model folder has format version {metadata.get('version')} (made by "
                         f"InvarianceExplorer {made}); InvarianceExplorer {__version__} reads version "
                         f"{MODEL_VERSION}: use the InvarianceExplorer it was made with, or make it again "
                         "(invariance-explorer fit)")
    return metadata


def load_denoiser(folder_or_name: Union[str, os.PathLike], device="cpu") -> Denoiser:
    """Load a denoiser from its model folder or by bundled name (see :func:`resolve_model_folder`).

    Every weight file is checked against its SHA-256 in ``metadata.json`` (a mismatch raises
    ``ValueError`` naming the file) and read with safetensors. The network is returned in
    eval mode with frozen weights on ``device`` (see :func:`~.devices.resolve_device`).
    """
    from .devices import resolve_device

    folder = resolve_model_folder(folder_or_name)
    metadata = read_metadata(folder)
    architecture = metadata["architecture"]
    for record in metadata["weights"].values():
        verify_weights(folder, record)
    if architecture["name"] == CUSTOM:
        from .custom_denoisers import build_custom_network

        network = build_custom_network(folder, metadata)
    else:
        network = load_network(partial(build_denoiser, architecture["name"]), architecture.get("arguments", {}),
                               folder, metadata["weights"]["denoiser"])
    network.eval().requires_grad_(False).to(resolve_device(device))
    return Denoiser(network, HUNormalization.from_dict(metadata["normalization"]), metadata, folder)
