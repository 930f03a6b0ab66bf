"""The folder ``invariance-explorer sample`` writes, read back for viewers (no Qt, no slicer).

``sample --out DIR`` creates ``DIR`` whole, holding (every NRRD in the patient's LPS frame,
as ITK writes it):

* ``input.nrrd`` — the crop x of the input slice (a one-slice 3D NRRD with the crop's own
  origin: its geometry is *the crop geometry* used for every result below);
* ``denoised.nrrd`` — f(x); ``reconstruction.nrrd`` — D(E(x, f(x)), f(x));
* ``invariances.nrrd`` — the K samples x~_k as a 3D stack (numpy axis 0 = sample k) with
  the crop's in-plane geometry; ``denoised_invariances.nrrd`` — f(x~_k), the same way;
* ``std.nrrd`` — the per-pixel standard deviation of the x~_k (HU);
* ``numbers.json`` — ``{model, input, center_ijk, patch_size, count, seed, device,
  samples: [{index, mean_abs_change_hu, mean_abs_output_change_hu}], consistency,
  refinement: {centre, sample} (the consistency refinement's steps), seconds}``;
* ``figure.png``.

This module writes such a folder (:func:`write_result`), reads it (:func:`load_result`), gives
the crop's IJK-to-RAS matrix as 3D Slicer wants it (:func:`ijk_to_ras`: ITK/NRRD geometry is
LPS, Slicer's world is RAS) and the per-sample table (:func:`sample_table`). The standalone
app and the Slicer module both use it, so the Slicer layer only turns these arrays and
matrices into nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .image import CTImage

#: Output name (as in the CLI's ``done`` event) -> file name in the folder.
FILES: Dict[str, str] = {
    "input": "input.nrrd",
    "denoised": "denoised.nrrd",
    "reconstruction": "reconstruction.nrrd",
    "invariances": "invariances.nrrd",
    "denoised_invariances": "denoised_invariances.nrrd",
    "std": "std.nrrd",
    "numbers": "numbers.json",
    "figure": "figure.png",
}
#: Volumes that hold one image (the crop) and those that hold a stack of K samples.
SINGLE_VOLUMES = ("input", "denoised", "reconstruction", "std")
STACK_VOLUMES = ("invariances", "denoised_invariances")

#: Per-sample table: column name -> key in ``numbers.json``'s ``samples`` records.
TABLE_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("sample", "index"),
    ("mean |x~ - x| (HU)", "mean_abs_change_hu"),
    ("mean |f(x~) - f(x)| (HU)", "mean_abs_output_change_hu"),
)

#: LPS <-> RAS: negate the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_volume(path) -> CTImage:
    """Read any scalar NRRD as written by the engine, as stored (3D arrays stay 3D, values are
    not checked as HU: std maps and stacks are read too; NaN or infinite values are refused).
    Geometry in LPS, as in the file."""
    import SimpleITK as sitk

    from .io import read_itk

    image = read_itk(path)
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise ValueError(f"{path}: expected a scalar 2D or 3D image")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:  # the engine writes none: a damaged or foreign file
        raise ValueError(f"{path}: {bad} of {array.size} values are NaN or infinite; the engine writes none. "
                         "Write the file again (or run the command that made it again)")
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    direction = np.asarray(image.GetDirection(), dtype=float)
    if image.GetDimension() == 2:
        direction = np.pad(direction.reshape(2, 2), (0, 1)) + np.diag([0.0, 0.0, 1.0])
        array = array[None]
    return CTImage(array, spacing, origin, tuple(direction.ravel()))


def ijk_to_lps(image: CTImage) -> np.ndarray:
    """4x4 matrix from voxel index (i = column, j = row, k = slice) to LPS mm."""
    matrix = np.eye(4)
    matrix[:3, :3] = image.direction_matrix * np.asarray(image.spacing)[None, :]
    matrix[:3, 3] = image.origin
    return matrix


def ijk_to_ras(image: CTImage) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of ``image`` (the matrix a Slicer volume node takes)."""
    return LPS_TO_RAS @ ijk_to_lps(image)


def geometry_from_ijk_to_ras(matrix) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """(spacing, origin, direction) in LPS, ITK's convention, of a Slicer IJK-to-RAS matrix."""
    lps = LPS_TO_RAS @ np.asarray(matrix, dtype=float)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    direction = columns / spacing[None, :]
    return tuple(spacing), tuple(lps[:3, 3]), tuple(direction.ravel())


def ras_to_ijk_index(point_ras: Sequence[float], ijk_to_ras_matrix) -> Tuple[int, int, int]:
    """The voxel (i, j, k) whose centre is nearest to the RAS point (e.g. a markups point)."""
    ijk = np.linalg.inv(np.asarray(ijk_to_ras_matrix, dtype=float)) @ np.append(np.asarray(point_ras, float), 1.0)
    return tuple(int(v) for v in np.floor(ijk[:3] + 0.5))


def check_center(center_ijk: Sequence[int], shape_zyx: Sequence[int]) -> None:
    """``ValueError`` naming the problem if voxel (i, j, k) (or (i, j) of a slice) lies outside a
    volume of numpy shape (z, y, x) (or (y, x))."""
    i, j, k = (*center_ijk, 0) if len(center_ijk) == 2 else center_ijk
    nz, ny, nx = (1,) * (3 - len(shape_zyx)) + tuple(shape_zyx)
    if not (0 <= i < nx and 0 <= j < ny and 0 <= k < nz):
        raise ValueError(f"the point (voxel {i}, {j}, {k}) lies outside the volume ({nx} x {ny} x {nz} voxels); "
                         f"place it inside the image: i in 0..{nx - 1}, j in 0..{ny - 1}, k in 0..{nz - 1}")


def stack_frames(stack: CTImage) -> List[np.ndarray]:
    """The K samples of a stack volume as one-slice arrays ``(1, H, W)`` (numpy axis 0 = k)."""
    return [stack.array[k][None] for k in range(stack.array.shape[0])]


def sample_table(numbers: dict) -> Dict[str, np.ndarray]:
    """The per-sample columns of ``numbers.json`` (see :data:`TABLE_COLUMNS`), in sample order."""
    samples = sorted(numbers.get("samples", []), key=lambda s: s["index"])
    columns = {}
    for name, key in TABLE_COLUMNS:
        dtype = np.int32 if key == "index" else np.float64
        columns[name] = np.asarray([s[key] for s in samples], dtype=dtype)
    return columns


@dataclass
class SampleResult:
    """A sample output folder read back (see the module docstring).

    ``volumes`` maps the names of :data:`SINGLE_VOLUMES` and :data:`STACK_VOLUMES` that are
    present to :class:`CTImage` (3D arrays as stored); ``crop`` is the geometry of the crop
    (``input.nrrd``), the geometry every result is shown with.
    """

    folder: Path
    volumes: Dict[str, CTImage]
    numbers: dict
    figure: Optional[Path]

    @property
    def crop(self) -> CTImage:
        return self.volumes["input"]

    @property
    def count(self) -> int:
        return int(self.volumes["invariances"].array.shape[0])

    def crop_ijk_to_ras(self) -> np.ndarray:
        """IJK-to-RAS of one crop-sized slice, for every single volume and every sample frame."""
        return ijk_to_ras(self.crop)

    def frames(self, name: str) -> List[np.ndarray]:
        return stack_frames(self.volumes[name])

    def table(self) -> Dict[str, np.ndarray]:
        return sample_table(self.numbers)


def _check_samples(samples, count: int, path: Path) -> None:
    """numbers.json's per-sample records: one per sample k = 0 .. count - 1, with numbers."""
    fix = "the sample folder is damaged: sample the patch again"
    if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
        raise ValueError(f"{path}: \"samples\" must be a list of per-sample records; {fix}")
    keys = [key for _, key in TABLE_COLUMNS]
    for s in samples:
        if not all(k in s and isinstance(s[k], (int, float)) and not isinstance(s[k], bool) for k in keys):
            raise ValueError(f"{path}: a per-sample record lacks a number for one of {', '.join(keys)}: {s}; {fix}")
    if sorted(s["index"] for s in samples) != list(range(count)):
        raise ValueError(f"{path}: \"samples\" should hold one record per sample 0..{count - 1}; {fix}")


def write_result(folder, result, patch, image: CTImage, *, model, model_folder, input, denoiser: str,
                 written: Optional[Callable[[int], None]] = None) -> dict:
    """Write the files of :data:`FILES` (module docstring) into the existing folder ``folder``:
    the sampler's ``result`` (:class:`~.sampler.Invariances`, HU) for ``patch``
    (:class:`~.image.Patch`, the crop) of ``image`` (the whole input), sampled with the model
    ``model`` (as the user named it; its folder ``model_folder``, its denoiser ``denoiser``)
    from the file or folder ``input``. ``written(n)`` is called after each of the n files.
    The caller makes the folder appear whole (:func:`~.io.written_whole`). Returns the
    numbers written to ``numbers.json``."""
    from .figures import invariances_figure
    from .io import write_json, write_nrrd

    folder, content = Path(folder), patch.content  # the figures' pixels: not padding, nor air a scanner leaves
    crop = patch.image
    stack = CTImage(result.invariances, crop.spacing, crop.origin, crop.direction)  # axis 0: sample k
    images = {"input": (crop, result.x), "denoised": (crop, result.denoised),
              "reconstruction": (crop, result.reconstruction), "invariances": (stack, result.invariances),
              "denoised_invariances": (stack, result.denoised_invariances), "std": (crop, result.std)}
    for n, (name, (geometry, array)) in enumerate(images.items()):
        write_nrrd(geometry, folder / FILES[name], array=array)
        if written:
            written(n + 1)
    numbers = {
        "model": str(model), "model_folder": str(Path(model_folder).resolve()), "denoiser": denoiser,
        "input": str(input), "center_ijk": list(patch.center_ijk), "patch_size": int(patch.array.shape[-1]),
        "center_lps_mm": [round(float(v), 3) for v in np.asarray(image.origin) + image.direction_matrix
                          @ (np.asarray(patch.center_ijk, dtype=float) * image.spacing)],
        "padded_pixels": patch.padded_pixels, "content_pixels": int(content.sum()),
        "count": result.count, "seed": result.seed,
        "batch_size": result.batch_size, "device": result.device,
        "samples": [{"index": k, "mean_abs_change_hu": float(a), "mean_abs_output_change_hu": float(b)}
                    for k, (a, b) in enumerate(zip(result.mean_abs_change_hu, result.mean_abs_output_change_hu))],
        "mean_abs_change_hu": float(result.mean_abs_change_hu.mean()),
        "mean_abs_output_change_hu": float(result.mean_abs_output_change_hu.mean()),
        "consistency": result.consistency,
        "refinement": result.refinement.as_dict(),
        "reconstruction": {"mean_abs_error_hu": float(np.abs(result.reconstruction - result.x)[content].mean()),
                           "mean_abs_output_error_hu": float(np.abs(result.denoised_reconstruction -
                                                                    result.denoised)[content].mean())},
        "seconds": result.seconds,
        "invariances_stack": "axis 0 of invariances.nrrd and denoised_invariances.nrrd is the sample index k",
    }
    write_json(folder / FILES["numbers"], numbers)
    if written:
        written(len(images) + 1)
    invariances_figure([result], folder / FILES["figure"])
    if written:
        written(len(FILES))
    return numbers


def load_result(folder) -> SampleResult:
    """Read a ``sample`` output folder; ``ValueError`` naming what is missing or inconsistent."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such results folder")
    missing = [f for n, f in FILES.items() if n in ("input", "invariances", "numbers") and not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder}: not a complete sample results folder (missing {', '.join(missing)})")
    volumes = {name: read_volume(folder / FILES[name]) for name in SINGLE_VOLUMES + STACK_VOLUMES
               if (folder / FILES[name]).is_file()}
    from .io import read_json_object

    numbers = read_json_object(folder / FILES["numbers"], "the sample folder is damaged: sample the patch again")
    crop = volumes["input"]
    if crop.array.shape[0] != 1:
        raise ValueError(f"{folder / FILES['input']}: the crop should be one slice; it has {crop.array.shape[0]}")
    for name, image in volumes.items():
        if image.array.shape[1:] != crop.array.shape[1:]:
            raise ValueError(f"{folder / FILES[name]}: in-plane size {image.array.shape[1:]} differs from the "
                             f"crop's {crop.array.shape[1:]}")
    count = volumes["invariances"].array.shape[0]
    for name in STACK_VOLUMES:
        if name in volumes and volumes[name].array.shape[0] != int(numbers.get("count", count)):
            raise ValueError(f"{folder / FILES[name]}: {volumes[name].array.shape[0]} samples, "
                             + (f"numbers.json says {numbers['count']}" if "count" in numbers else
                                f"invariances.nrrd holds {count}"))
    _check_samples(numbers.get("samples", []), count, folder / FILES["numbers"])
    figure = folder / FILES["figure"]
    return SampleResult(folder, volumes, numbers, figure if figure.is_file() else None)


#: Roles of the result nodes the Slicer module creates -> name suffix after the input's name.
RESULT_ROLES: Dict[str, str] = {
    "crop": "x (crop)",
    "denoised": "f(x)",
    "reconstruction": "reconstruction",
    "std": "std of invariances",
    "invariances": "invariances",
    "denoised_invariances": "f(invariances)",
    "browser": "invariances browser",
    "table": "invariance numbers",
    "chart": "invariance numbers chart",
    "series_change": "mean |x~ - x|",
    "series_output_change": "mean |f(x~) - f(x)|",
}


def result_node_names(input_name: str) -> Dict[str, str]:
    """The names of the result nodes of an input volume named ``input_name``, by role; a
    re-run finds its earlier results by these roles (and asks before replacing renamed ones)."""
    return {role: f"{input_name} {suffix}" for role, suffix in RESULT_ROLES.items()}
