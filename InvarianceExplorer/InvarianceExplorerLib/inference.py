"""Applying a denoiser to CT images, and measuring its output against full dose.

:func:`denoise` takes a :class:`~.image.CTImage` in HU (a slice or a volume, denoised
slice by slice) and returns the denoised image in HU with the same geometry.
:func:`apply_network` is the one place where a network meets image tensors: slices larger
than a tile go through MONAI's sliding-window inferer with an overlap of one receptive
field, and every output pixel comes from a window in which it lies at least a
receptive-field radius from the window's inner edges. Tiled and whole-slice outputs
therefore agree to float precision: tiling saves memory, it does not change the result. :func:`image_quality` gives the fidelity figures (RMSE, PSNR, SSIM).
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import numpy as np
import torch

from .denoisers import Denoiser, receptive_field
from .image import CTImage

#: HU range to which denoised and reference images are clipped for :func:`image_quality`
#: (air to dense bone, as in ldct-benchmark); its width is the data range of PSNR and SSIM.
METRIC_HU_RANGE = (-1024.0, 1900.0)

def apply_network(network: torch.nn.Module, x: torch.Tensor, tile_size: Optional[int] = 512,
                  tiles_per_batch: int = 4) -> torch.Tensor:
    """``network(x)`` for a batch of slices ``x`` ``(N, C, H, W)`` in network units.

    Slices with a side longer than ``tile_size`` pixels (None: never) go through MONAI's
    :class:`~monai.inferers.SlidingWindowInferer` in ``tile_size`` windows
    (``tiles_per_batch`` per forward pass) overlapping by one receptive field. Each window
    contributes only its core: the pixels at least a receptive-field radius ``r`` from its
    edges inside the image (a window edge on the image border is the network's own border).
    The inferer averages ``[y * core, core]`` over windows, and their ratio is the average of
    ``y`` over the windows whose core holds a pixel, so the result equals ``network(x)`` up
    to float rounding. Gradients flow if enabled by the caller.
    """
    rf = receptive_field(network)
    height, width = x.shape[-2:]
    if min(height, width) < rf:
        raise ValueError(f"slices of {width} x {height} pixels are smaller than the denoiser's receptive field "
                         f"({rf} pixels); give larger images")
    if tile_size is None or (height <= tile_size and width <= tile_size):
        return network(x)
    from monai.inferers import SlidingWindowInferer

    if tile_size < rf:
        raise ValueError(f"tile size {tile_size} is smaller than the receptive field ({rf} pixels); "
                         f"use at least {rf}, better several times that")
    r = rf // 2
    roi = (min(height, tile_size), min(width, tile_size))
    size = (height, width)

    def cores(window: torch.Tensor, where) -> torch.Tensor:
        y = network(window)
        core = torch.zeros_like(y[:, :1])
        for k, (*_, rows, cols) in enumerate(where):
            (a, b), (c, d) = [(0 if s.start == 0 else r, n - (0 if s.stop == full else r))
                              for s, n, full in zip((rows, cols), roi, size)]
            core[k, :, a:b, c:d] = 1
        return torch.cat([y * core, core], dim=1)

    # consecutive windows overlap by 2 r pixels at least: MONAI steps by int(roi * (1 - overlap)) <= roi - 2 r
    inferer = SlidingWindowInferer(roi, tiles_per_batch, overlap=[2 * r / n for n in roi], mode="constant",
                                   with_coord=True)
    out = inferer(x, cores)
    return out[:, :-1] / out[:, -1:]


def denoise(denoiser: Denoiser, image: CTImage, device="auto", batch_size: int = 4, tile_size: Optional[int] = 512,
            progress: Optional[Callable[[int, int], None]] = None) -> CTImage:
    """Denoise ``image`` (HU, a slice or a volume) slice by slice with ``denoiser``.

    HU are mapped to network units and back with the denoiser's own
    :class:`~.normalization.HUNormalization`. ``batch_size`` slices go through the network
    at once; slices larger than ``tile_size`` are tiled (:func:`apply_network`) unless the
    denoiser is declared for full images.
    ``progress(done, total)`` is called after each batch with the number of slices done.
    Returns a float32 CTImage in HU with ``image``'s geometry.
    """
    from .devices import resolve_device
    from .io import check_hu

    if not isinstance(image, CTImage):
        raise TypeError(f"denoise takes a CTImage; got {type(image).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    check_hu(image.array, "input image")
    warn_on_spacing(denoiser, image)
    device = resolve_device(device)
    network = denoiser.to(device).network.eval()
    norm = denoiser.normalization
    stack = image.array[None] if image.is_slice else image.array
    out = np.empty_like(stack)
    total = stack.shape[0]
    with torch.inference_mode():
        for start in range(0, total, batch_size):
            x = torch.from_numpy(stack[start:start + batch_size, None]).to(device)
            y = apply_network(network, norm.normalize(x), tile_size if denoiser.use == "patch" else None, batch_size)
            out[start:start + batch_size] = norm.denormalize(y)[:, 0].float().cpu().numpy()
            if progress is not None:
                progress(min(start + batch_size, total), total)
    return image.with_array(out[0] if image.is_slice else out)


def warn_on_spacing(denoiser: Denoiser, image: CTImage) -> None:
    """Warn when the pixel size differs by more than 25 % from the training data's, which
    changes the noise texture and structure scale the denoiser has learnt."""
    trained = denoiser.metadata.get("training", {}).get("data", {}).get("pixel_spacing_mm")
    if trained:
        x, y = image.pixel_spacing[:2]
        if not all(0.8 <= size / float(trained) <= 1.25 for size in (x, y)):
            size = f"{x:.2f} mm" if abs(x - y) < 0.005 else f"{x:.2f} x {y:.2f} mm"
            warnings.warn(f"the image has {size} pixels but {denoiser.arch} was trained on "
                          f"{float(trained):.2f} mm pixels; its output may be less reliable", RuntimeWarning)


def image_quality(denoised_hu, reference_hu) -> Dict[str, float]:
    """Fidelity of ``denoised_hu`` to ``reference_hu`` (full dose), both HU, ``(H, W)`` or
    ``(N, H, W)`` (then averaged over the N slices), computed with :mod:`monai.metrics` on
    values clipped to :data:`METRIC_HU_RANGE`: ``rmse_hu`` (root mean squared error, HU),
    ``psnr_db`` and ``ssim`` (Gaussian window 11 px, sigma 1.5), both with the range's width
    (2924 HU) as data range."""
    from monai.metrics import PSNRMetric, RMSEMetric, SSIMMetric

    lo, hi = METRIC_HU_RANGE
    tensors = []
    for a in (denoised_hu, reference_hu):
        t = torch.as_tensor(np.asarray(a, dtype=np.float32)).clamp(lo, hi)
        tensors.append(t.reshape(-1, 1, *t.shape[-2:]))
    pred, ref = tensors
    if pred.shape != ref.shape:
        raise ValueError(f"denoised {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    data_range = hi - lo
    return {
        "rmse_hu": float(RMSEMetric()(pred, ref).mean()),
        "psnr_db": float(PSNRMetric(max_val=data_range)(pred, ref).mean()),
        "ssim": float(SSIMMetric(spatial_dims=2, data_range=data_range)(pred, ref).mean()),
    }
