"""Sampling the invariances of a denoiser: the engine's entry point for everything else.

For a CT patch x (HU) and a frozen denoiser f with its representation (cVAE, :mod:`.representation`)
and invariance flow (cINN, :mod:`.invariance_flow`), :meth:`InvarianceSampler.sample` follows
the paper's recipe (docs/method.md, section 4; the authors' ``reconstruct.py``):

1. y = f(x); the posterior mean z of E(x, y) and the cVAE reconstruction D(z, y);
2. draw ``v_k ~ N(0, I)``, ``z_k = t^-1(v_k | y)``, ``x~_k = D(z_k, y)``;
3. feed each x~_k back through f and compare ``f(x~_k)`` with y.

Consistency refinement (ours; :class:`Refinement`, the model folder's setting unless given)
moves the decoded x~_k, before step 3, towards images that f maps to y, by gradient steps
on ``0.5 ||f(x~) - y||^2`` (:func:`refine_invariances`): the range / null-space split of
image restoration. The part of x~_k that f passes on is pulled to what y fixes; the part f
does not pass on stays. Linearised, a direction in which f passes on a fraction g of a change
keeps ``(1 - g^2)`` of its distance from f's pre-image per step. It uses f and y only, never
x. The samples share most of what f still sees in them, so the steps come in two stages:
``centre`` steps on the decode of the flow's centre, ``D(t^-1(0 | y), y)``, computed once
per patch, whose change is added to every sample; then ``sample`` steps on each sample,
which also act on how the samples differ from each other.

Everything that depends on y alone (the decoder's conditioning, the flow's embedding) is
computed once per patch. The ``v_k`` are drawn on the CPU from a ``torch.Generator`` seeded
with ``seed``, all at once, so a seed gives the same codes on every device and for every
batch size; results are bit-identical for the same seed, device and batch size (on CUDA
the first pass of a batch shape runs eagerly, later ones replay a CUDA graph of it: the same
samples within float rounding, :meth:`InvarianceSampler.draw`).

Patches: :func:`crop_patch` cuts the model's patch around a voxel of a slice or volume and
keeps its geometry, so outputs can be written as NRRD in the right physical place.

Model folders: the cVAE and cINN live in the denoiser's model folder (``Resources/Models/<arch>/``)
as two more weight records, ``"cvae"`` and ``"cinn"`` (safetensors files with SHA-256 in
``metadata.json``), and ``metadata["invariance"]`` holds their constructor arguments and
the patch size; see :func:`save_invariance_models` and :func:`load_invariance_models`.
Training (:mod:`.train_invariance`) writes the cVAE first (:func:`save_representation`,
read back by :func:`load_representation`) and adds the cINN trained on its codes.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .denoisers import (Denoiser, load_denoiser, load_network, read_metadata, resolve_model_folder, save_weights,
                        write_metadata)
from .image import CTImage
from .invariance_flow import InvarianceFlow, build_invariance_flow
from .progress import ProgressCallback
from .representation import Representation, build_representation
from .result_folder import check_center

#: Version of the ``metadata["invariance"]`` record.
INVARIANCE_VERSION = 1
#: Weight record names (and file stems) of the two models in a model folder.
CVAE, CINN = "cvae", "cinn"
#: HU that fills the part of a patch outside the image (air).
AIR_HU = -1000.0

#: Invariances per forward pass when none is given, by device type: 10 on the CPU (of batches
#: of 10, 25 and 100 the whole sample, refined or not, is fastest at 10 there: README, speed
#: paragraph), 100 on CUDA (one pass for the benchmark's 100 invariances, replayed from a CUDA
#: graph, :meth:`InvarianceSampler.draw`: 5 ms on an H200; batches of 10 were bound by kernel launches).
BATCH_SIZE = {"cpu": 10, "cuda": 100}
#: CUDA graphs a sampler keeps (one per batch shape, each with its own GPU memory pool).
GRAPHS_KEPT = 4


def default_batch_size(device) -> int:
    """:data:`BATCH_SIZE` of ``device``'s type (the CPU's for any other type)."""
    return BATCH_SIZE.get(torch.device(device).type, BATCH_SIZE["cpu"])



# ----------------------------------------------------------------------------- model folders


@dataclass(frozen=True)
class Refinement:
    """The sampler's consistency refinement (module docstring): ``centre`` gradient steps on
    the decode of the flow's centre (once per patch, its change added to every sample), then
    ``sample`` steps on each sample. ``Refinement()`` (0, 0) is none."""

    centre: int = 0
    sample: int = 0

    def __post_init__(self):
        for name in ("centre", "sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"consistency refinement: {name} steps must be a whole number >= 0; got {value!r}")

    @classmethod
    def parse(cls, value) -> "Refinement":
        """From a :class:`Refinement`, None (none), a pair ``(centre, sample)``, a dict
        ``{"centre", "sample"}`` or text ``"CENTRE,SAMPLE"``; ``ValueError`` saying what is wrong."""
        if value is None or isinstance(value, Refinement):
            return value or cls()
        if isinstance(value, dict):
            unknown = set(value) - {"centre", "sample"}
            if unknown:
                raise ValueError(f"consistency refinement: unknown keys {sorted(unknown)}; use centre and sample")
            return cls(**value)
        given = value
        if isinstance(value, str):
            try:
                value = [int(part) for part in value.split(",")]
            except ValueError:
                value = None
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("consistency refinement: give two whole numbers, the centre and the per-sample steps "
                             f"(e.g. 5,1; 0,0 for none); got {given!r}")
        return cls(*value)

    def as_dict(self) -> dict:
        return {"centre": self.centre, "sample": self.sample}

    def __bool__(self) -> bool:
        return bool(self.centre or self.sample)


#: The refinement the bundled model folders hold (their sampler's default; with it all four
#: meet issue 4's consistency bar) and the fidelity figures report beside those without it.
#: Method A analyses refined samples against a refined null of scans, or without scans with a
#: rescan floor estimated from x and the folder's noise texture (README).
CHECKED_REFINEMENT = Refinement(centre=5, sample=1)


@dataclass
class InvarianceModels:
    """A denoiser f with the representation and invariance flow trained for it.

    :func:`load_invariance_models` returns them in eval mode with frozen weights; models
    built in memory (e.g. by training, for validation figures) are used as they are: the
    sampler runs them under ``torch.inference_mode`` and changes neither mode nor weights
    (none of these networks has layers that behave differently in training mode).

    Attributes:
        denoiser: f (:class:`~.denoisers.Denoiser`: network, normalisation, metadata).
        representation: the cVAE (or unconditional VAE).
        flow: the cINN.
        folder: the model folder they were loaded from (None when built in memory).
        refinement: the sampler's consistency refinement for these models
            (``metadata["invariance"]["refinement"]``; none when absent).
    """

    denoiser: Denoiser
    representation: Representation
    flow: InvarianceFlow
    folder: Optional[Path] = None
    refinement: Refinement = field(default_factory=Refinement)

    def __post_init__(self):
        if self.representation.z_dim != self.flow.z_dim:
            raise ValueError(f"the representation's z has {self.representation.z_dim} numbers but the invariance "
                             f"flow expects {self.flow.z_dim}; they must be trained together")
        self.refinement = Refinement.parse(self.refinement)

    @property
    def patch_size(self) -> int:
        """Side in pixels of the square patches the models work on."""
        return self.representation.patch_size

    def to(self, device) -> "InvarianceModels":
        """Move the networks to ``device``, the cVAE and cINN laid out channels-last (faster
        convolutions on a CPU, same samples up to float rounding; see :meth:`Denoiser.to`)."""
        self.denoiser.to(device)
        for module in (self.representation, self.flow):
            module.to(device, memory_format=torch.channels_last)
        return self


def save_invariance_models(folder, representation: Representation, flow: InvarianceFlow,
                           metadata: Optional[dict] = None, *, dtype: str = "float32") -> Path:
    """Add a representation (cVAE) and invariance flow (cINN) to the denoiser model folder
    ``folder`` (written by :func:`~.denoisers.save_denoiser`): ``cvae.safetensors`` and
    ``cinn.safetensors`` (floating-point values stored as ``dtype``), their records in
    ``metadata["weights"]`` and ``metadata["invariance"] = {"version", "patch_size",
    "conditional", "z_dim", "cvae": arguments, "cinn": arguments, **metadata}`` (``metadata``:
    training details and figures). Replaces earlier invariance models. Returns the folder."""
    folder = resolve_model_folder(folder)
    record = read_metadata(folder)
    if representation.z_dim != flow.z_dim:
        raise ValueError(f"representation z_dim {representation.z_dim} differs from flow z_dim {flow.z_dim}")
    record["weights"][CVAE] = save_weights(representation, folder / f"{CVAE}.safetensors", dtype)
    record["weights"][CINN] = save_weights(flow, folder / f"{CINN}.safetensors", dtype)
    record["invariance"] = {"version": INVARIANCE_VERSION, "patch_size": representation.patch_size,
                            "conditional": representation.conditional, "z_dim": representation.z_dim,
                            CVAE: representation.arguments, CINN: flow.arguments, **(metadata or {})}
    write_metadata(folder, record)
    return folder


def save_representation(folder, representation: Representation, metadata: Optional[dict] = None, *,
                        dtype: str = "float32") -> Path:
    """Add a representation (cVAE) alone to the denoiser model folder ``folder``: the first
    half of its invariance models, written after the cVAE's training and completed by
    :func:`save_invariance_models` once the invariance flow is trained for it. Writes
    ``cvae.safetensors`` and ``metadata["invariance"]`` as :func:`save_invariance_models`
    does, without ``"cinn"``; an earlier cINN is removed (it was trained on another cVAE's
    codes). Returns the folder."""
    folder = resolve_model_folder(folder)
    record = read_metadata(folder)
    if record["weights"].pop(CINN, None) is not None:
        (folder / f"{CINN}.safetensors").unlink(missing_ok=True)
    record["weights"][CVAE] = save_weights(representation, folder / f"{CVAE}.safetensors", dtype)
    record["invariance"] = {"version": INVARIANCE_VERSION, "patch_size": representation.patch_size,
                            "conditional": representation.conditional, "z_dim": representation.z_dim,
                            CVAE: representation.arguments, **(metadata or {})}
    write_metadata(folder, record)
    return folder


def load_representation(folder_or_name, device="cpu") -> Tuple[Denoiser, Representation]:
    """The denoiser of a model folder (or bundled name) and the representation (cVAE) trained
    for it (checked and loaded as in :func:`load_invariance_models`; the cINN need not be
    there yet), frozen in eval mode on ``device``. ``ValueError`` when there is no cVAE."""
    from .devices import resolve_device

    folder = resolve_model_folder(folder_or_name)
    metadata = read_metadata(folder)
    info = metadata.get("invariance") or {}
    if CVAE not in metadata.get("weights", {}) or CVAE not in info:
        raise ValueError(f"{folder}: this model folder holds no representation (cVAE) for its denoiser "
                         f"{metadata['architecture']['name']}; train one first (invariance-explorer train cvae)")
    device = resolve_device(device)
    denoiser = load_denoiser(folder, device=device)
    representation = load_network(build_representation, info[CVAE], folder, metadata["weights"][CVAE])
    representation.eval().requires_grad_(False).to(device)
    return denoiser, representation


def has_invariance_models(folder_or_name) -> bool:
    """Whether a model folder (or bundled denoiser) holds a cVAE and a cINN."""
    try:
        metadata = read_metadata(folder_or_name)
    except ValueError:
        return False
    return "invariance" in metadata and {CVAE, CINN} <= set(metadata.get("weights", {}))


def load_invariance_models(folder_or_name, device="cpu") -> InvarianceModels:
    """Load a denoiser with its cVAE and cINN from its model folder (or bundled name).

    Every weight file is checked against its SHA-256 and read with safetensors (nothing is
    unpickled); a folder without invariance models raises ``ValueError`` saying so and what
    to do. Models are returned in eval mode with frozen weights on ``device``.
    """
    from .devices import resolve_device

    folder = resolve_model_folder(folder_or_name)
    metadata = read_metadata(folder)
    info = metadata.get("invariance")
    if not info or not {CVAE, CINN} <= set(metadata.get("weights", {})):
        raise ValueError(f"{folder}: this model folder holds the denoiser "
                         f"{metadata['architecture']['name']} but no invariance models (cVAE and cINN); "
                         "train them for it (cVAE, then cINN) and save them with save_invariance_models, "
                         "or choose a model that has them")
    if int(info.get("version", 0)) > INVARIANCE_VERSION:
        raise ValueError(f"{folder}: invariance models of format version {info['version']}; this InvarianceExplorer "
                         f"reads version {INVARIANCE_VERSION} and older: update InvarianceExplorer")
    device = resolve_device(device)
    denoiser = load_denoiser(folder, device=device)  # checks every weight file's checksum
    representation = load_network(build_representation, info[CVAE], folder, metadata["weights"][CVAE])
    flow = load_network(build_invariance_flow, info[CINN], folder, metadata["weights"][CINN])
    for module in (representation, flow):
        module.eval().requires_grad_(False)
    return InvarianceModels(denoiser, representation, flow, folder, info.get("refinement")).to(device)


def _whole_number(name: str, value, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is a whole number (not a
    bool, float or string) within ``minimum``..``maximum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum or \
            (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be a whole number from {minimum}{f' to {maximum}' if maximum else ' up'}; "
                         f"got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- patches


@dataclass(frozen=True)
class Patch:
    """A square patch cut from a CT slice or volume (see :func:`crop_patch`).

    Attributes:
        image: the patch as a 2D :class:`~.image.CTImage` in HU whose geometry places it
            where it was cut (origin: the LPS position in mm of its pixel ``[0, 0]``; spacing
            and direction of the source, the slice thickness as its z spacing).
        center_ijk: the voxel ``(i, j, k)`` of the source it is centred on (i: column,
            j: row, k: slice; 0 for a 2D source); it is pixel ``[size // 2, size // 2]``.
        corner_ij: source column and row of the patch's pixel ``[0, 0]`` (negative when the
            patch reaches over the image's left or top border).
        padded_pixels: pixels of the patch outside the source image, filled with ``fill_hu``.
        inside: ``(P, P)`` bool, the patch's pixels inside the source image.
    """

    image: CTImage
    center_ijk: Tuple[int, int, int]
    corner_ij: Tuple[int, int]
    padded_pixels: int
    inside: np.ndarray

    @property
    def array(self) -> np.ndarray:
        return self.image.array

    @property
    def content(self) -> np.ndarray:
        """``(P, P)`` bool, the pixels holding image content: inside the source image and not
        constant fill (the air a scanner leaves outside its field of view), where
        :meth:`InvarianceSampler.sample`'s figures are taken (its ``content``)."""
        from .analysis import varying

        return self.inside & varying(self.array)


def _integer(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
        raise ValueError(f"{name} must be a whole voxel index; got {value!r}")
    return int(value)


def crop_patch(image: CTImage, center_ijk: Sequence[int], size: int, fill_hu: float = AIR_HU) -> Patch:
    """Cut the ``size`` x ``size`` patch centred on voxel ``center_ijk = (i, j, k)`` (column,
    row, slice; ``(i, j)`` or ``k = 0`` for a 2D slice) out of ``image``.

    Where the patch reaches over the image's border it is padded with ``fill_hu`` (default
    -1000 HU, air): beyond a CT image's edge there is usually air outside the body, and air
    adds no structure for the models to explain, unlike mirrored anatomy. Padded pixels are
    counted in :attr:`Patch.padded_pixels`; near a border the results describe a partly
    artificial patch, so centre on the anatomy of interest where possible.

    Raises ``ValueError`` when the centre lies outside the image or the image is smaller
    than the patch in-plane (pad or resample it to at least ``size`` pixels first).
    """
    if not isinstance(image, CTImage):
        raise TypeError(f"crop_patch takes a CTImage; got {type(image).__name__}")
    size = int(size)
    center = [_integer(v, "each centre index") for v in center_ijk]
    if len(center) == 2 and image.is_slice:
        center.append(0)
    if len(center) != 3:
        raise ValueError(f"the centre is a voxel (i, j, k) (column, row, slice) or, for a 2D slice, (i, j); "
                         f"got {tuple(center_ijk)} for a {'slice' if image.is_slice else 'volume'}")
    i, j, k = center
    check_center(center, image.array.shape)
    ny, nx = image.array.shape[-2:]
    if nx < size or ny < size:
        raise ValueError(f"the image is {nx} x {ny} pixels, smaller than the {size} x {size} patch the invariance "
                         f"models work on; give an image of at least {size} x {size} pixels")
    source = image.array if image.is_slice else image.array[k]
    i0, j0 = i - size // 2, j - size // 2
    patch = np.full((size, size), fill_hu, dtype=np.float32)
    r0, r1, c0, c1 = max(j0, 0), min(j0 + size, ny), max(i0, 0), min(i0 + size, nx)
    patch[r0 - j0:r1 - j0, c0 - i0:c1 - i0] = source[r0:r1, c0:c1]
    inside = np.zeros((size, size), bool)
    inside[r0 - j0:r1 - j0, c0 - i0:c1 - i0] = True
    sx, sy, sz = image.spacing
    origin = np.asarray(image.origin) + image.direction_matrix @ np.array([i0 * sx, j0 * sy, k * sz])
    crop = CTImage(patch, image.spacing, tuple(float(v) for v in origin), image.direction)
    return Patch(crop, (i, j, k), (i0, j0), size * size - (r1 - r0) * (c1 - c0), inside)


# ----------------------------------------------------------------------------- sampling


@dataclass
class Invariances:
    """Invariances of one patch (all images float32 HU, ``P`` the patch size).

    Attributes:
        x: the input patch ``(P, P)``.
        denoised: f(x) ``(P, P)``.
        reconstruction: the cVAE reconstruction D(mean E(x), f(x)) ``(P, P)``.
        denoised_reconstruction: f of the reconstruction ``(P, P)`` (completeness check).
        invariances: the samples x~_k ``(count, P, P)``.
        denoised_invariances: f(x~_k) ``(count, P, P)``.
        refinement: the consistency refinement the samples took (module docstring).
        std: per-pixel standard deviation of x~_k over k ``(P, P)`` (HU, population std).
        mean_abs_change_hu: mean |x~_k - x| per sample ``(count,)`` (HU), over the pixels
            holding image content (``content`` of :meth:`InvarianceSampler.sample`).
        mean_abs_output_change_hu: mean |f(x~_k) - f(x)| per sample ``(count,)`` (HU), likewise.
        consistency: C = mean|f(x~) - f(x)| / mean|x~ - x| over all samples (small: f
            barely notices what changed).
        v: the flow's code of x, t(mean E(x) | f(x)) ``(z_dim,)``.
        seed, batch_size, device: how they were sampled (the batch size and device actually
            used after any out-of-memory fall-back).
        seconds: wall time of the whole :meth:`InvarianceSampler.sample` call.
    """

    x: np.ndarray
    denoised: np.ndarray
    reconstruction: np.ndarray
    denoised_reconstruction: np.ndarray
    invariances: np.ndarray
    denoised_invariances: np.ndarray
    refinement: Refinement
    std: np.ndarray
    mean_abs_change_hu: np.ndarray
    mean_abs_output_change_hu: np.ndarray
    consistency: float
    v: np.ndarray
    seed: int
    batch_size: int
    device: str
    seconds: float = field(default=0.0)

    @property
    def count(self) -> int:
        return self.invariances.shape[0]


def _out_of_memory_errors() -> tuple:
    return tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def run_with_memory_fallback(run: Callable[[torch.device, int], object], device: torch.device, batch_size: int
                             ) -> Tuple[object, torch.device, int]:
    """``run(device, batch_size)``; on CUDA out-of-memory retry with half the batch, and
    after batch size 1 on the CPU (with the batch first asked for, at most the CPU's
    :data:`BATCH_SIZE`: the GPU's memory says nothing of the CPU's), warning each time.
    Returns ``(result, device, batch_size)`` as finally used. Errors on the CPU are not caught."""
    device, asked = torch.device(device), batch_size
    while True:
        try:
            return run(device, batch_size), device, batch_size
        except _out_of_memory_errors():
            if device.type != "cuda":
                raise
            torch.cuda.empty_cache()
            if batch_size > 1:
                batch_size = max(1, batch_size // 2)
                warnings.warn(f"CUDA out of memory; retrying with batch size {batch_size}", RuntimeWarning)
            else:
                device = torch.device("cpu")
                batch_size = min(asked, default_batch_size(device))
                warnings.warn(f"CUDA out of memory even at batch size 1; continuing on the CPU with batch size "
                              f"{batch_size}", RuntimeWarning)


def refine_invariances(f: Callable[[torch.Tensor], torch.Tensor], x_tilde: torch.Tensor, y: torch.Tensor,
                       steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``steps`` gradient steps on each image's ``0.5 ||f(x~) - y||^2`` (network units; module
    docstring), of size 1, halved for an image whose loss a step would raise (that step is not
    taken). ``x_tilde`` ``(N, 1, P, P)``, ``y`` = f(x) ``(1, 1, P, P)``. Returns the refined
    x~ and f of it, detached; costs ``steps + 1`` passes of f forward and ``steps`` backward."""
    def evaluate(x: torch.Tensor, need_grad: bool):
        x = x.detach().requires_grad_(True)
        out = f(x)
        loss = 0.5 * (out - y).square().flatten(1).sum(1)
        grad = torch.autograd.grad(loss.sum(), x)[0] if need_grad else None
        return loss.detach(), out.detach(), grad

    def pick(take: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(take.view(-1, *[1] * (new.dim() - 1)), new, old)

    with torch.inference_mode(False), torch.enable_grad():
        x, y = x_tilde.clone(), y.clone()  # normal tensors (the inputs may be inference tensors)
        loss, out, grad = evaluate(x, steps > 0)
        size = torch.ones_like(loss)
        for k in range(steps):
            candidate = x - size.view(-1, 1, 1, 1) * grad
            new_loss, new_out, new_grad = evaluate(candidate, k + 1 < steps)
            better = new_loss <= loss
            x, out, loss = pick(better, candidate, x), pick(better, new_out, out), pick(better, new_loss, loss)
            if new_grad is not None:
                grad = pick(better, new_grad, grad)
            size = torch.where(better, size, size / 2)
    return x.detach(), out


class InvarianceSampler:
    """Sample invariances x~ of a denoiser f for CT patches: ``f(x~) ~= f(x)``.

    Args:
        models: a model folder or bundled denoiser name holding invariance models, or
            loaded :class:`InvarianceModels`.
        device: "auto" (CUDA when present, else the CPU), "cpu" or "cuda" (the CPU, with a
            warning, when there is no GPU).
    """

    def __init__(self, models: Union[InvarianceModels, str, Path], device="auto"):
        from .devices import resolve_device

        self.device = resolve_device(device)
        if not isinstance(models, InvarianceModels):
            models = load_invariance_models(models, device=self.device)
        self.models = models.to(self.device)
        #: On CUDA, replay the cINN + decoder from captured graphs (:meth:`draw`); False: eager.
        self.cuda_graphs = True
        self._graphs = {}  # batch shape -> devices.CudaGraphCall, for the weights of _graphs_for
        self._graphs_for = None
        self._shapes_seen = set()

    @property
    def patch_size(self) -> int:
        return self.models.patch_size

    def crop(self, image: CTImage, center_ijk: Sequence[int], fill_hu: float = AIR_HU) -> Patch:
        """:func:`crop_patch` with this model's patch size."""
        return crop_patch(image, center_ijk, self.patch_size, fill_hu)

    def draw(self, v: torch.Tensor, y: torch.Tensor, condition, embedding: torch.Tensor) -> torch.Tensor:
        """Decoded samples ``D(t^-1(v | f(x)), f(x))`` ``(N, 1, P, P)`` (network units) of flow
        codes ``v`` ``(N, z_dim)``, given ``y`` = f(x), the decoder's ``condition`` and the
        flow's ``embedding`` of it (each once per patch), in inference mode. On CUDA (with
        :attr:`cuda_graphs`) a batch shape met before is replayed from a CUDA graph
        (:class:`~.devices.CudaGraphCall`; the first pass of a shape runs eagerly): eager, its
        few hundred small kernels are bound by their launches. Graphs are dropped when the
        models' weights move (or out of GPU memory); where capture fails the sampler stays
        eager, with a warning. Not thread-safe."""
        from .devices import CudaGraphCall

        rep, flow = self.models.representation, self.models.flow

        def run(v, y, condition, embedding):
            return rep.decode(flow.reverse(v, embedding=embedding), y, condition)

        with torch.inference_mode():
            if v.device.type != "cuda" or not self.cuda_graphs:
                return run(v, y, condition, embedding)
            weights = (v.device, id(rep), id(flow), *(t.data_ptr() for module in (rep, flow)
                                                      for t in (*module.parameters(), *module.buffers())))
            if weights != self._graphs_for:  # a graph reads the weights where they were at capture
                self.release_graphs()
                self._graphs_for = weights
            key = tuple(v.shape)
            if key not in self._graphs:
                if key not in self._shapes_seen:  # the eager pass is the capture's warm-up
                    self._shapes_seen.add(key)
                    return run(v, y, condition, embedding)
                if len(self._graphs) >= GRAPHS_KEPT:  # each holds its own memory pool
                    del self._graphs[next(iter(self._graphs))]
                try:
                    self._graphs[key] = CudaGraphCall(run, v, y, condition, embedding)
                except _out_of_memory_errors():
                    self.release_graphs()  # run_with_memory_fallback halves the batch
                    raise
                except Exception as error:  # an operation that cannot be captured
                    cause = error.__context__ or error
                    warnings.warn(f"sampling without CUDA graphs: capturing one failed ({cause})", RuntimeWarning)
                    self.cuda_graphs = False
                    self.release_graphs()
                    return run(v, y, condition, embedding)
            return self._graphs[key](v, y, condition, embedding)

    def release_graphs(self) -> None:
        """Drop the captured CUDA graphs and the GPU memory they hold (:meth:`draw`)."""
        self._graphs.clear()
        self._graphs_for = None

    def sample(self, x_hu, count: int = 16, seed: int = 0, batch_size: Optional[int] = None,
               progress: Optional[ProgressCallback] = None, refinement=None, content=None) -> Invariances:
        """``count`` invariances of the patch ``x_hu`` (HU, ``(P, P)`` with P the patch size),
        ``batch_size`` at a time (None: :data:`BATCH_SIZE` of the device), reproducible for
        ``seed`` (see the module docstring), with ``refinement`` (anything
        :meth:`Refinement.parse` reads; None: the models' setting). ``content``: the pixels over
        which the per-sample figures and C are averaged (:attr:`Patch.content`; None: all, or
        the content of a :class:`Patch` given as ``x_hu``), so that padding and constant fill
        do not dilute them. ``x_hu`` may be an array, a tensor, a 2D CTImage or a Patch.
        ``progress(stage, done, total)`` reports the stages "encoding" and "sampling"."""
        from .io import STANDARD_HU, check_hu

        if isinstance(x_hu, Patch) and content is None:
            content = x_hu.content
        if isinstance(x_hu, torch.Tensor):
            x_hu = x_hu.detach().cpu()
        x_hu = np.asarray(getattr(x_hu, "array", x_hu), dtype=np.float32)
        count, seed = _whole_number("count", count, 1), _whole_number("seed", seed, 0, 2 ** 63 - 1)
        if batch_size is not None:
            batch_size = _whole_number("batch_size", batch_size, 1)
        p = self.patch_size
        if x_hu.shape != (p, p):
            raise ValueError(f"the invariance models work on {p} x {p} patches; got an image of shape {x_hu.shape}: "
                             "cut one with crop_patch / InvarianceSampler.crop")
        check_hu(x_hu, "input patch")
        low, high = STANDARD_HU
        for pixels, bound, extreme, what in (
                (int(np.count_nonzero(x_hu > high)), f"above {high:g}", f"up to {x_hu.max():.0f}",
                 "metal on an extended-scale CT?"),
                (int(np.count_nonzero(x_hu < low)), f"below {low:g}", f"down to {x_hu.min():.0f}",
                 "a fill value outside the scanner's field of view?")):
            if pixels:
                warnings.warn(f"{pixels} pixels of the patch lie {bound} HU ({extreme} HU: {what}), beyond the CT the "
                              "models were trained on; the invariances and their figures are unreliable there",
                              RuntimeWarning)
        if batch_size is None:
            batch_size = default_batch_size(self.device)
        refinement = self.models.refinement if refinement is None else Refinement.parse(refinement)
        start = time.perf_counter()
        v = torch.randn(count, self.models.flow.z_dim, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float32)
        content = np.ones((p, p), bool) if content is None else np.asarray(content, bool)
        if content.shape != (p, p) or not content.any():
            raise ValueError(f"content must be a ({p}, {p}) mask with at least one pixel set (Patch.content); "
                             f"got shape {content.shape}")
        if float(np.ptp(x_hu[content])) <= 1e-3:
            raise ValueError(f"the patch holds no image content: it is {float(x_hu[content][0]):g} HU throughout"
                             f"{' (where it lies in the image)' if not content.all() else ''}, padding or the air "
                             "outside the scanner's field of view; centre it on the anatomy")

        def attempt(dev: torch.device, bs: int) -> dict:
            try:
                return self._sample(x_hu, v, dev, bs, progress, refinement)
            except _out_of_memory_errors():
                self.release_graphs()  # their memory pools too, before a smaller batch or the CPU
                raise

        result, device, batch_size = run_with_memory_fallback(attempt, self.device, int(batch_size))
        change = np.abs(result["invariances"] - result["x"])[:, content].mean(axis=1)
        output_change = np.abs(result["denoised_invariances"] - result["denoised"])[:, content].mean(axis=1)
        result.update(mean_abs_change_hu=change, mean_abs_output_change_hu=output_change,
                      consistency=float(output_change.mean() / max(change.mean(), 1e-12)))
        if device != self.device:
            self.device = device
            self.models.to(device)
        return Invariances(**result, refinement=refinement, seed=int(seed), batch_size=batch_size, device=str(device),
                           seconds=time.perf_counter() - start)

    def refine_null(self, x_hu, null_hu, refinement=None, batch_size: Optional[int] = None) -> np.ndarray:
        """Noise-only images of the patch ``x_hu`` ``(J, P, P)`` (HU; new scans of the same
        anatomy at its dose) refined towards f(x) as :meth:`sample` refines its samples with
        ``refinement`` (None: the models' setting): ``centre`` steps on their mean, whose change
        is added to each, then ``sample`` steps on each, ``batch_size`` at a time (None: as
        :meth:`sample`). The null of the analysis for refined invariances: the steps shape
        noise by f's local gain (:func:`~.analysis.noise_shape`).
        Returns the refined images (HU), the given ones unchanged without refinement."""
        null_hu = np.asarray(null_hu, dtype=np.float32)
        x_hu = np.asarray(getattr(x_hu, "array", x_hu), dtype=np.float32)
        if null_hu.ndim != 3 or null_hu.shape[1:] != x_hu.shape:
            raise ValueError(f"the noise-only images must be a stack (J, {x_hu.shape[0]}, {x_hu.shape[1]}) like the "
                             f"patch; got shape {null_hu.shape}")
        refinement = self.models.refinement if refinement is None else Refinement.parse(refinement)
        if not refinement:
            return null_hu.copy()
        models = self.models.to(self.device)
        norm = models.denoiser.normalization

        f = models.denoiser

        with torch.inference_mode():
            y = f(norm.normalize(torch.from_numpy(x_hu)).to(self.device)[None, None])
            null = norm.normalize(torch.from_numpy(null_hu)).to(self.device)[:, None]
        if refinement.centre:
            mean = null.mean(0, keepdim=True)
            null = null + (refine_invariances(f, mean, y, refinement.centre)[0] - mean)
        batch_size = default_batch_size(self.device) if batch_size is None else int(batch_size)
        refined = [refine_invariances(f, null[i:i + batch_size], y, refinement.sample)[0]
                   for i in range(0, null.shape[0], batch_size)]
        return norm.denormalize(torch.cat(refined)[:, 0]).float().cpu().numpy()

    def _sample(self, x_hu: np.ndarray, v: torch.Tensor, device: torch.device, batch_size: int,
                progress: Optional[ProgressCallback], refinement: Refinement) -> dict:
        report = progress or (lambda stage, done, total: None)
        models = self.models.to(device)
        norm, rep, flow = models.denoiser.normalization, models.representation, models.flow

        f = models.denoiser

        def hu(t: torch.Tensor) -> np.ndarray:
            return norm.denormalize(t[:, 0]).float().cpu().numpy()

        count = v.shape[0]
        with torch.inference_mode():
            report("encoding", 0, 1)
            x = norm.normalize(torch.from_numpy(x_hu)).to(device)[None, None]
            y = f(x)
            mean, _ = rep.encode(x, y)
            condition = rep.condition(y)  # once per patch
            embedding = flow.embed(y)  # once per patch
            reconstruction = rep.decode(mean, y, condition)
            code, _ = flow(mean, embedding=embedding)
            denoised_reconstruction = f(reconstruction)
            if refinement.centre:  # the flow's centre v = 0, decoded
                origin = torch.zeros(1, flow.z_dim, device=device, dtype=torch.float32)
                centre = rep.decode(flow.reverse(origin, embedding=embedding), y, condition)
        if refinement.centre:  # what every sample gets added
            shift = refine_invariances(f, centre, y, refinement.centre)[0] - centre
        report("encoding", 1, 1)
        report("sampling", 0, count)
        samples, outputs = [], []
        for first in range(0, count, batch_size):
            with torch.inference_mode():
                x_tilde = self.draw(v[first:first + batch_size].to(device), y, condition, embedding)
                if refinement.centre:
                    x_tilde = x_tilde + shift
                if not refinement.sample:
                    y_tilde = f(x_tilde)
            if refinement.sample:
                x_tilde, y_tilde = refine_invariances(f, x_tilde, y, refinement.sample)
            samples.append(hu(x_tilde))
            outputs.append(hu(y_tilde))
            report("sampling", min(first + batch_size, count), count)
        x_np, y_np = x_hu.copy(), hu(y)[0]
        invariances, denoised_invariances = np.concatenate(samples), np.concatenate(outputs)
        return dict(x=x_np, denoised=y_np, reconstruction=hu(reconstruction)[0],
                    denoised_reconstruction=hu(denoised_reconstruction)[0], invariances=invariances,
                    denoised_invariances=denoised_invariances, std=invariances.std(axis=0),
                    v=code[0].float().cpu().numpy())
