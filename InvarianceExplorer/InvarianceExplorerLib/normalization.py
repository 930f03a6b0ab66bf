"""HU normalisation for the networks: the one place that defines it.

The paper (and eeulig/ldct-benchmark) stores CT values as ``HU + 1024`` and standardises
them with the data-set mean and standard deviation of the Mayo "LDCT and Projection data"
chest scans: ``(HU + 1024 - 481.45) / 502.19``. Every network input and output in this
project goes through :class:`HUNormalization`; the MONAI transform it builds uses the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class HUNormalization:
    """Affine map between HU and network units: ``(HU + offset - mean) / std``.

    Attributes:
        offset: value added to HU before standardisation (1024 for stored CT values).
        mean: data-set mean in stored units (HU + offset).
        std: data-set standard deviation in the same units (equal to HU).
    """

    offset: float = 1024.0
    mean: float = 481.45
    std: float = 502.19

    def __post_init__(self):
        if not (np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"normalisation std must be positive; got {self.std}")
        if not (np.isfinite(self.offset) and np.isfinite(self.mean)):
            raise ValueError(f"normalisation offset and mean must be finite numbers; got {self.offset}, {self.mean}")

    @property
    def shift_hu(self) -> float:
        """The HU value that maps to 0 (``mean - offset``)."""
        return self.mean - self.offset

    def normalize(self, hu):
        """HU (numpy array or torch tensor) to network units."""
        return (hu - self.shift_hu) / self.std

    def denormalize(self, value):
        """Network units back to HU."""
        return value * self.std + self.shift_hu

    def monai_transform(self, keys=None):
        """The same map as a MONAI transform (dictionary transform when ``keys`` is given)."""
        from monai.transforms import NormalizeIntensity, NormalizeIntensityd

        kwargs = dict(subtrahend=self.shift_hu, divisor=self.std)
        return NormalizeIntensityd(keys=keys, **kwargs) if keys else NormalizeIntensity(**kwargs)

    @classmethod
    def window(cls, low_hu: float, high_hu: float) -> "HUNormalization":
        """The HU window ``[low_hu, high_hu]`` mapped linearly onto ``[0, 1]`` (not clipped:
        the invariance engine needs an invertible map)."""
        if not high_hu > low_hu:
            raise ValueError(f"a HU window needs low < high; got {low_hu}, {high_hu}")
        return cls(offset=0.0, mean=float(low_hu), std=float(high_hu) - float(low_hu))

    @classmethod
    def parse(cls, text: str) -> "HUNormalization":
        """A normalisation from its short form: ``paper`` (:data:`PAPER_NORMALIZATION`),
        ``identity`` (the network works in HU), ``window:LOW,HIGH`` (HU window onto 0..1) or
        ``mean-std:MEAN,STD`` (``(HU - MEAN) / STD``, both in HU)."""
        kind, _, numbers = str(text).strip().partition(":")
        try:
            values = [float(v) for v in numbers.split(",")] if numbers else []
        except ValueError:
            values = None
        expected = {"paper": 0, "identity": 0, "window": 2, "mean-std": 2}
        if kind not in expected or values is None or len(values) != expected[kind]:
            raise ValueError(f"normalisation {text!r} is not one of: paper, identity, window:LOW,HIGH (HU), "
                             "mean-std:MEAN,STD (HU); e.g. window:-1024,3072")
        if kind == "paper":
            return PAPER_NORMALIZATION
        if kind == "identity":
            return cls(offset=0.0, mean=0.0, std=1.0)
        if kind == "window":
            return cls.window(*values)
        return cls(offset=0.0, mean=values[0], std=values[1])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HUNormalization":
        return cls(**{k: float(d[k]) for k in ("offset", "mean", "std")})


#: The paper's normalisation (Mayo chest statistics).
PAPER_NORMALIZATION = HUNormalization()
