"""Your own denoiser: a TorchScript file, a MONAI bundle folder, or a Python class with its
state dict, checked and written as a model folder the engine uses like a bundled one.

:func:`import_denoiser` checks the network (:func:`check_denoiser`: one channel in, one out,
same spatial size, finite, deterministic in eval mode, runs on the chosen device, output
plausible in HU under the declared normalisation) and writes a model folder of the bundled
shape (``metadata.json`` with SHA-256 of every file, model card) whose
``architecture.name`` is :data:`CUSTOM` and ``architecture.kind`` one of :data:`KINDS`:

- ``torchscript``: the file, copied as ``denoiser.torchscript.pt`` (``torch.jit.load``).
- ``monai-bundle``: the bundle's config file holding ``network_def`` (and its
  ``configs/metadata.json``) copied under ``bundle/``, instantiated with
  ``monai.bundle.ConfigParser``; weights as ``denoiser.safetensors``.
- ``python``: ``package.module:Class`` (importable wherever the folder is used) or
  ``path/to/file.py:Class`` (the file is copied as ``network.py``), the constructor's
  arguments, weights as ``denoiser.safetensors``.

State dicts are read with ``torch.load(weights_only=True)`` or safetensors. The user declares
the input normalisation (:meth:`~.normalization.HUNormalization.parse`) and the use:
``patch`` (a local network; large slices are tiled) or ``full-image`` (applied to whole
slices only). The receptive field is measured (gradient support of a centre pixel).
A folder's code runs only where it is trusted (:mod:`.trusted_code`): importing trusts it.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .denoisers import (CUSTOM, MODEL_FORMAT, MODEL_VERSION, folder_file, save_weights, sha256, verify_weights,
                        write_metadata)
from .io import last_line, read_json_object, written_whole
from .normalization import HUNormalization
from .trusted_code import require_trust, trust

KINDS = ("torchscript", "monai-bundle", "python")
USES = ("patch", "full-image")
TORCHSCRIPT_FILE = "denoiser.torchscript.pt"
NETWORK_FILE = "network.py"
BUNDLE_DIR = "bundle"
#: Largest receptive field (pixels) measured; a network that looks further is "full-image".
#: A power of two, so that U-Nets whose sizes must divide by 2^n (up to 2^8) run on it.
PROBE_SIZE = 256
#: Mean |f(x) - x| (HU) on CT patches above which the declared normalisation is deemed wrong.
MAX_MEAN_CHANGE_HU = 200.0
#: Largest difference (HU) between two eval-mode runs on the same input.
DETERMINISM_TOLERANCE_HU = 0.01


class DenoiserCheckError(ValueError):
    """The network does not behave as a denoiser of one-channel CT images; the message says
    what it did and what to do."""


class ImportedNetwork(nn.Module):
    """A user's network with its measured ``receptive_field`` (pixels) declared for tiling."""

    def __init__(self, network: nn.Module, receptive_field: int):
        super().__init__()
        self.module = network
        self.receptive_field = int(receptive_field)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# ----------------------------------------------------------------------------- reading the user's files


def read_declaration(path) -> dict:
    """The small JSON file in which a user declares a denoiser: any of ``normalization``
    (short form of :meth:`~.normalization.HUNormalization.parse`), ``use`` (:data:`USES`),
    ``class`` (``module:Class`` or ``file.py:Class``), ``arguments`` (constructor keywords),
    ``name`` (shown in model cards)."""
    declared = read_json_object(path, 'a denoiser declaration is a JSON object such as {"normalization": '
                                      '"window:-1024,3072", "use": "patch"}')
    known = {"normalization", "use", "class", "arguments", "name"}
    if set(declared) - known:
        raise ValueError(f"{path}: a denoiser declaration is a JSON object with keys among "
                         f"{', '.join(sorted(known))} (unknown: {', '.join(sorted(set(declared) - known))})")
    if not isinstance(declared.get("arguments", {}), dict):
        raise ValueError(f"{path}: \"arguments\" are the class's constructor keywords, a JSON object such as "
                         '{"width": 8}')
    return declared


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def detect_kind(source, class_path: Optional[str] = None) -> str:
    """:data:`KINDS` entry for ``source``: a folder is a MONAI bundle, a file with
    ``class_path`` a state dict, a TorchScript archive TorchScript."""
    source = Path(source)
    if source.is_dir():
        if class_path:
            raise ValueError(f"{source} is a MONAI bundle folder, whose network_def builds the network: drop --class "
                             "(and --arguments)")
        return "monai-bundle"
    if not source.is_file():
        raise ValueError(f"{source}: no such file or folder; give a TorchScript file, a MONAI bundle folder or a "
                         "state dict file with --class")
    if class_path and _is_torchscript(source):
        raise ValueError(f"{source} is a TorchScript file, which holds its network: drop --class (and --arguments)")
    if class_path:
        return "python"
    if _is_torchscript(source):
        return "torchscript"
    raise ValueError(f"{source}: not a TorchScript file (torch.jit.save); for a state dict give the network's class "
                     "as --class package.module:Class (or file.py:Class) and its --arguments")


def load_state_dict(path) -> dict:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` file read with
    ``weights_only=True``; a checkpoint holding the state dict under ``state_dict``,
    ``model`` or ``network`` is unwrapped, and a ``module.`` prefix (DataParallel) dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors' errors become one message
            raise ValueError(f"{path}: cannot read it as safetensors ({_last_line(error)}); the file is damaged or "
                             "not safetensors") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - the unpickler's many errors become one message
            raise ValueError(f"{path}: cannot read it as weights with torch.load(weights_only=True) ({error}); "
                             "save the state dict alone (torch.save(model.state_dict(), path)) or as "
                             "safetensors") from None
    for key in ("state_dict", "model", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _last_line(error: BaseException) -> str:
    """What went wrong, in one line, with the error's type: the innermost cause (MONAI wraps
    the constructor's error), the last line of its message (:func:`~.io.last_line`)."""
    while error.__cause__ is not None:
        error = error.__cause__
    last, name = last_line(error), type(error).__name__
    return last if last.startswith(f"{name}:") else f"{name}: {last}".rstrip(": ")


def _load_into(network: nn.Module, state: dict, where: str) -> nn.Module:
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape: the first one says enough
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line] or [str(error)]
        raise ValueError(f"{where}: the weights do not fit the network ({lines[0].rstrip('.')}); check the class and "
                         "its arguments") from None
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not fit the network: missing {list(missing)[:5]}, unexpected "
                         f"{list(unexpected)[:5]}; check the class and its arguments")
    return network


def _python_class(class_path: str, file: Optional[Path] = None):
    """The class of ``module:Class`` or ``file.py:Class`` (``file`` overrides the path)."""
    module_name, sep, name = class_path.rpartition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"class {class_path!r}: write it as package.module:Class or path/to/file.py:Class")
    if file is not None or module_name.endswith(".py"):
        path = Path(file or module_name)
        if not path.is_file():
            raise ValueError(f"class {class_path!r}: {path} does not exist")
        unique = f"_invariance_explorer_network_{sha256(path)[:16]}"
        module = sys.modules.get(unique)
        if module is None:
            spec = importlib.util.spec_from_file_location(unique, path)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as error:  # noqa: BLE001 - the user's file: what it raised is the message
                raise ValueError(f"class {class_path!r}: {path} cannot be run ({_last_line(error)}); it must be one "
                                 "self-contained file that imports only installed packages") from None
            sys.modules[unique] = module
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - ImportError, or what the module raised
            raise ValueError(f"class {class_path!r}: cannot import {module_name} ({error}); install it or give "
                             "path/to/file.py:Class") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"class {class_path!r}: {name} is not a torch.nn.Module subclass in {module_name}")
    return cls


def _construct(cls, class_path: str, arguments: Optional[dict]) -> nn.Module:
    """``cls(**arguments)``, with a ``ValueError`` saying what the constructor refused."""
    if arguments is not None and not isinstance(arguments, dict):
        raise ValueError(f"class {class_path!r}: its arguments are constructor keywords, a JSON object such as "
                         f'{{"width": 8}}; got {arguments!r}')
    try:
        return cls(**dict(arguments or {}))
    except Exception as error:  # noqa: BLE001 - the user's constructor: what it raised is the message
        raise ValueError(f"class {class_path!r} cannot be built with arguments {dict(arguments or {})} "
                         f"({_last_line(error)}); give its constructor's keywords (fit --arguments JSON, or "
                         "\"arguments\" in the declaration)") from None


def _bundle_files(bundle: Path) -> Tuple[Path, Optional[Path], Path]:
    """A MONAI bundle's config file defining ``network_def``, its ``configs/metadata.json``
    (or None) and its weights (``models/model.pt``, ``.safetensors`` or ``.ts``)."""
    configs = bundle / "configs"
    candidates = [configs / f"{stem}.{ext}" for stem in ("inference", "train") for ext in ("json", "yaml", "yml")]
    config = next((c for c in candidates if c.is_file() and "network_def" in _read_config(c)), None)
    if config is None:
        raise ValueError(f"{bundle}: not a MONAI bundle with a network: no configs/inference.json (or .yaml, or "
                         "train.*) defining network_def")
    weights = next((bundle / "models" / f"model.{ext}" for ext in ("pt", "safetensors", "ts")
                    if (bundle / "models" / f"model.{ext}").is_file()), None)
    if weights is None:
        raise ValueError(f"{bundle}: the bundle has no weights (models/model.pt, model.safetensors or model.ts)")
    metadata = configs / "metadata.json"
    return config, (metadata if metadata.is_file() else None), weights


def _read_config(path: Path) -> dict:
    from monai.bundle import ConfigParser

    try:
        content = ConfigParser.load_config_file(str(path))
    except Exception as error:  # noqa: BLE001 - JSON and YAML errors become one message
        raise ValueError(f"{path}: cannot be read as a MONAI bundle config ({_last_line(error)})") from None
    return content if isinstance(content, dict) else {}


def _check_bundle_channels(metadata: Optional[Path]) -> None:
    if metadata is None:
        return
    fmt = read_json_object(metadata, "fix the bundle's metadata.json").get("network_data_format", {})
    for side, default in (("inputs", "image"), ("outputs", "pred")):
        entries = fmt.get(side, {}) if isinstance(fmt, dict) else None
        entry = (entries.get(default) or next(iter(entries.values()), {})) if isinstance(entries, dict) else None
        if not isinstance(entry, dict):
            raise ValueError(f"{metadata}: network_data_format.{side} is not as MONAI's bundle specification has it "
                             f"({{\"{default}\": {{\"num_channels\": 1, ...}}}}); fix the bundle's metadata.json")
        channels = entry.get("num_channels")
        if channels not in (None, 1):
            raise DenoiserCheckError(f"{metadata}: the bundle's network_data_format declares {channels} "
                                     f"{side[:-1]} channels; a CT denoiser takes and returns one channel")


def _bundle_network(config: Path, bundle_root: Path) -> nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_root)
    try:
        network = parser.get_parsed_content("network_def", instantiate=True)
    except Exception as error:  # noqa: BLE001 - what MONAI raised is the message
        raise ValueError(f"{config}: network_def cannot be built ({_last_line(error)}); fix the bundle's config "
                         "or install what it needs") from None
    if not isinstance(network, nn.Module):
        raise ValueError(f"{config}: network_def made a {type(network).__name__}, not a torch.nn.Module")
    return network


# ----------------------------------------------------------------------------- building from a model folder


def build_custom_network(folder, metadata: dict) -> nn.Module:
    """The network of an imported model folder (files checked against their SHA-256 first),
    as an :class:`ImportedNetwork` on the CPU."""
    folder = Path(folder)
    architecture = metadata["architecture"]
    kind = architecture.get("kind")
    for record in architecture.get("files", {}).values():
        verify_weights(folder, record)
    require_trust(folder, metadata)  # before any of its code runs
    weights = metadata["weights"]["denoiser"]
    if kind == "torchscript":
        network = torch.jit.load(str(verify_weights(folder, weights)), map_location="cpu")
    elif kind == "python":
        files = architecture.get("files", {})
        network_file = folder_file(folder, files["network"]) if "network" in files else None
        cls = _python_class(architecture["class"], network_file)
        network = _load_into(_construct(cls, architecture["class"], architecture.get("arguments", {})),
                             load_state_dict(verify_weights(folder, weights)), str(folder))
    elif kind == "monai-bundle":
        config = folder_file(folder, architecture["files"]["config"])
        network = _load_into(_bundle_network(config, config.parent),
                             load_state_dict(verify_weights(folder, weights)), str(folder))
    else:
        raise ValueError(f"{folder}: unknown kind of imported denoiser {kind!r} (known: {', '.join(KINDS)}); "
                         "update InvarianceExplorer")
    return ImportedNetwork(network.float(), architecture["receptive_field"])


# ----------------------------------------------------------------------------- checks


def probe_patches(size: int = 128, count: int = 2) -> np.ndarray:
    """``count`` low-dose CT patches ``(count, size, size)`` in HU from the bundled sample CT
    (lung, soft tissue, bone): what the checks feed the network."""
    from .io import read_image
    from .sample_data import sample_ct_path

    image = read_image(sample_ct_path()).array
    image = image if image.ndim == 3 else image[None]
    h, w = image.shape[-2:]
    size = min(size, h, w)
    corners = [(h // 2 - size // 2 + dy, w // 2 - size // 2 + dx) for dy, dx in ((-60, 90), (40, -110), (0, 0))]
    return np.stack([image[k % len(image), max(0, r):max(0, r) + size, max(0, c):max(0, c) + size]
                     for k, (r, c) in zip(range(count), corners * count)]).astype(np.float32)


def _check_fail(what: str) -> DenoiserCheckError:
    return DenoiserCheckError(f"the denoiser failed its check: {what}")


def measure_receptive_field(network: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Side (pixels, odd) of the square of input pixels one output pixel depends on: the
    widest gradient support, over the probe ``x`` ``(1, 1, S, S)``, of five output pixels (the
    centre and four points S/4 from it); None when a support reaches the probe's border (the
    network looks at least about S/2 pixels wide)."""
    s = x.shape[-1]
    radius = 0
    for dy, dx in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
        row, col = s // 2 + dy * (s // 4), s // 2 + dx * (s // 4)
        probe = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            network(probe)[0, 0, row, col].backward()
        support = (probe.grad[0, 0] != 0).nonzero()
        if support.numel() == 0:
            continue
        low, high = support.min(0).values, support.max(0).values
        if int(low.min()) == 0 or int(high.max()) == s - 1:
            return None
        centre = torch.tensor([row, col])
        radius = max(radius, int((centre - low).max()), int((high - centre).max()))
    return 2 * radius + 1


def check_denoiser(network: nn.Module, normalization: HUNormalization, *, use: str = "patch", device="cpu",
                   patch_size: int = 128) -> dict:
    """Check that ``network`` (in eval mode) behaves as a CT denoiser on ``device``: it runs
    on ``(2, 1, P, P)`` patches of the sample CT, returns one tensor of the same shape,
    finite, equal to within :data:`DETERMINISM_TOLERANCE_HU` on a second run, and changes
    the patches by less than :data:`MAX_MEAN_CHANGE_HU` on average (else the declared
    normalisation is wrong). ``normalization``: the declared HU <-> network units map;
    ``use``: "patch" (a local network, tiled on large slices) or "full-image"; ``patch_size``:
    P in pixels. Raises :class:`DenoiserCheckError` saying what the network did; returns
    what was measured, with the receptive field (pixels)."""
    from .devices import resolve_device

    if use not in USES:
        raise ValueError(f"use is one of {', '.join(USES)}; got {use!r}")
    device = resolve_device(device)
    try:
        network = network.to(device).eval()
    except Exception as error:  # noqa: BLE001
        raise _check_fail(f"it cannot be moved to {device} ({error})") from None
    hu = torch.from_numpy(probe_patches(patch_size, 2))[:, None]
    x = normalization.normalize(hu).to(device)
    shape = tuple(x.shape)
    try:
        with torch.no_grad():
            first, second = network(x), network(x)
    except Exception as error:  # noqa: BLE001 - what the network raised is the message
        raise _check_fail(f"it raised {_last_line(error)} on a {shape} float32 batch on {device}. "
                          "It must take (N, 1, H, W) images of one channel (CT values under the declared "
                          "normalisation)") from None
    if not isinstance(first, torch.Tensor):
        raise _check_fail(f"it returned a {type(first).__name__}, not a tensor; wrap it so that forward returns "
                          "the denoised (N, 1, H, W) image")
    if first.ndim != 4 or first.shape[1] != 1:
        channels = f"{first.shape[1]} channels" if first.ndim == 4 else f"a tensor of shape {tuple(first.shape)}"
        raise _check_fail(f"for a {shape} input it returned {channels}; a denoiser returns one channel "
                          "(N, 1, H, W)")
    if tuple(first.shape) != shape:
        raise _check_fail(f"for a {shape} input it returned shape {tuple(first.shape)}; the output must have "
                          "the input's spatial size (pad inside the network)")
    bad = int((~torch.isfinite(first)).sum())
    if bad:
        raise _check_fail(f"its output holds {bad} NaN or infinite values on CT patches")
    out_hu, again_hu = normalization.denormalize(first.float()), normalization.denormalize(second.float())
    spread = float((out_hu - again_hu).abs().max())
    if spread > DETERMINISM_TOLERANCE_HU:
        raise _check_fail(f"two runs on the same input in eval mode differ by up to {spread:.3g} HU; it is not "
                          "deterministic (dropout or sampling active in eval mode?)")
    change = float((out_hu.cpu() - hu).abs().mean())
    if not change < MAX_MEAN_CHANGE_HU:
        raise _check_fail(f"it changes CT patches by {change:.0f} HU on average (a denoiser changes them by tens "
                          f"of HU): is it trained, and is the declared normalisation ({normalization.to_dict()}) "
                          "the one it was trained with, for its input and its output?")
    field_input = normalization.normalize(torch.from_numpy(probe_patches(PROBE_SIZE, 1))[:, None]).to(device)
    try:
        field = measure_receptive_field(network, field_input)
    except Exception as error:  # noqa: BLE001 - e.g. a network that needs other sizes
        raise _check_fail(f"it raised {_last_line(error)} on a {tuple(field_input.shape)} image, used to measure "
                          f"how far it looks; it must take (N, 1, H, W) images of {PROBE_SIZE} pixels as well as of "
                          f"{patch_size} (and have gradients, for the sampler)") from None
    if field is None and use == "patch":
        raise _check_fail(f"its output pixels depend on inputs more than {field_input.shape[-1]} pixels apart, too "
                          "far for patch-wise use; declare use full-image")
    return {"device": str(device), "probe": "bundled sample CT patches", "input_shape": list(shape),
            "mean_abs_change_hu": round(change, 3), "repeat_max_difference_hu": spread,
            "receptive_field": field if field is not None else int(field_input.shape[-1]),
            "receptive_field_lower_bound": field is None}


# ----------------------------------------------------------------------------- import


def read_network(source, class_path: Optional[str] = None, arguments: Optional[dict] = None
                 ) -> Tuple[nn.Module, str, dict]:
    """The user's network (CPU, float32, not yet checked), its :data:`KINDS` entry, and the
    files the model folder must keep: ``{role: (path, name in the folder)}``."""
    source = Path(source)
    kind = detect_kind(source, class_path)
    if arguments and kind != "python":
        raise ValueError(f"--arguments are the constructor keywords of a --class; {source} brings its network "
                         "(drop --arguments)")
    if kind == "torchscript":
        try:
            network = torch.jit.load(str(source), map_location="cpu")
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"{source}: torch.jit.load cannot read it ({error})") from None
        return network.float(), kind, {"torchscript": (source, TORCHSCRIPT_FILE)}
    if kind == "python":
        module_name = class_path.rpartition(":")[0]
        cls = _python_class(class_path)
        network = _load_into(_construct(cls, class_path, arguments), load_state_dict(source), str(source))
        files = {"network": (Path(module_name), NETWORK_FILE)} if module_name.endswith(".py") else {}
        return network.float(), kind, files
    config, metadata, weights = _bundle_files(source)
    _check_bundle_channels(metadata)
    if weights.suffix == ".ts":
        return read_network(weights)
    network = _load_into(_bundle_network(config, source), load_state_dict(weights), str(weights))
    files = {"config": (config, f"{BUNDLE_DIR}/{config.name}")}
    if metadata is not None:
        files["bundle_metadata"] = (metadata, f"{BUNDLE_DIR}/metadata.json")
    return network.float(), kind, files


def import_denoiser(source, out, *, normalization: HUNormalization, use: str = "patch",
                    class_path: Optional[str] = None, arguments: Optional[dict] = None, name: Optional[str] = None,
                    device="cpu", patch_size: int = 128, overwrite: bool = False) -> Path:
    """Check the user's denoiser ``source`` (TorchScript file, MONAI bundle folder, or state
    dict file with ``class_path`` and ``arguments``) with :func:`check_denoiser` on ``device``
    and write it as the model folder ``out`` (whole or not at all). ``name`` is shown in model
    cards (default: the source's name). Returns ``out``."""
    from . import __version__

    source, out = Path(source), Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise ValueError(f"{out} already exists and is not empty; choose a new model folder")
    network, kind, files = read_network(source, class_path, arguments)
    checks = check_denoiser(network, normalization, use=use, device=device, patch_size=patch_size)
    with written_whole(out) as work:
        records = {}
        for role, (path, stored) in files.items():
            (work / stored).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, work / stored)
            records[role] = {"file": stored, "sha256": sha256(work / stored)}
        if kind == "torchscript":
            weights = {"denoiser": {**records.pop("torchscript"), "dtype": "float32"}}
        else:
            weights = {"denoiser": save_weights(network, work / "denoiser.safetensors", "float32")}
        architecture = {"name": CUSTOM, "kind": kind, "display_name": name or source.stem, "use": use,
                        "receptive_field": checks["receptive_field"], "files": records,
                        "source": str(source.resolve())}
        if kind == "python":
            architecture.update({"class": class_path, "arguments": dict(arguments or {})})
        record = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "engine_version": __version__,
                  "architecture": architecture, "normalization": normalization.to_dict(), "weights": weights,
                  "checks": checks}
        write_metadata(work, record)
    try:  # the user's own code, imported on purpose: it may run when the folder loads
        trust(out, record)
    except OSError as error:
        warnings.warn(f"could not record that {out}'s code may run here ({error}); run `invariance-explorer trust "
                      f"{out}` before using it", RuntimeWarning)
    return out
