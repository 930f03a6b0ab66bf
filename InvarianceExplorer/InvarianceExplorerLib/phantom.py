"""Procedural chest CT phantoms: axial slices (or thin stacks) in HU with a label map.

A seed draws one thorax at the level of the heart, defined in millimetres so that its
anatomy does not depend on the pixel grid, then renders it on any grid. Frame: ``x``
towards the patient's left (image right), ``y`` posterior (image down), ``z`` superior,
origin at the centre of the field of view; images are in the standard radiological display
(anterior up, patient's left on the right).

The model, from outside in:

* body: a super-ellipse (flatter at the back) with random low harmonics for asymmetry,
  offset from the centre, under a layer of subcutaneous fat; air (-1000 HU) outside;
* chest wall: a layer of muscle over the ribs, thickened by pectoral, latissimus and back
  muscles, with fat between them and the subcutaneous fat;
* thoracic cavity: mediastinal fat holding the heart (myocardium and chambers, in
  pericardial fat), the descending (and sometimes ascending) aorta, the oesophagus and the
  trachea; the two lungs are the cavity less the mediastinum and the spine, with rounded
  corners, denser towards the back (gravity);
* tubes in 3D, rendered where they cross the slice: pulmonary vessels (trees from the hila
  and sub-trees across the lungs as wide as their distance from the hilum allows; radius 5
  to 0.5 mm, tapering, Murray's law at branchings), the airways (trachea, main, lobar and
  segmental bronchi: an air lumen in a soft-tissue wall; the carina lies 10 mm below to
  40 mm above the slice) and ribs sloping down the chest wall (cortical shell over
  trabecular bone);
* spine (vertebral body, arch around the spinal canal, spinous and transverse processes)
  and sternum, each a cortical shell over trabecular bone;
* lung nodules: spheres, solid or ground glass (with a hazier edge), 2-15 mm across.

Organ outlines are extruded along ``z`` (the model is a slab of about +-40 mm around the
slice ``z = 0``); tubes, nodules and tissue texture are 3D, so stacks are continuous.
Texture is smooth and of low amplitude: sums of random plane waves (wavelengths 8-40 mm
and 2.5-8 mm) whose amplitude depends on the tissue.

Rendering is a painter's algorithm with partial-volume edges: a structure covers a pixel
by ``alpha = clip(0.5 - d / pixel, 0, 1)`` (``d``: its signed distance in mm, negative
inside, measured in the slice), the HU blend by ``alpha`` and the pixel's label becomes
the structure's where ``alpha >= 0.5``. Tubes thinner than a pixel keep their line
integral (fainter, not wider). Random draws come from ``numpy.random.default_rng``, one
stream per part of the anatomy, so that one part's choices do not shift another's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Callable, Dict, Tuple

import numpy as np
from scipy.ndimage import map_coordinates

from .image import CTImage


class Label(enum.IntEnum):
    """Structure classes of the label map (the dominant tissue of a pixel)."""

    AIR = 0
    FAT = 1
    SOFT_TISSUE = 2  # muscle, mediastinal soft tissue, airway walls, oesophagus, spinal canal
    LUNG = 3
    VESSEL = 4
    AIRWAY = 5  # air in the trachea and bronchi
    HEART = 6
    AORTA = 7
    TRABECULAR_BONE = 8
    CORTICAL_BONE = 9
    NODULE_SOLID = 10
    NODULE_GROUND_GLASS = 11


#: Nominal HU range (low, high) of each label without contrast agent.
HU_RANGES: Dict[Label, Tuple[float, float]] = {
    Label.AIR: (-1000.0, -1000.0),
    Label.FAT: (-130.0, -70.0),
    Label.SOFT_TISSUE: (20.0, 70.0),
    Label.LUNG: (-950.0, -750.0),
    Label.VESSEL: (25.0, 55.0),
    Label.AIRWAY: (-1000.0, -950.0),
    Label.HEART: (25.0, 65.0),
    Label.AORTA: (25.0, 55.0),
    Label.TRABECULAR_BONE: (150.0, 450.0),
    Label.CORTICAL_BONE: (650.0, 1600.0),
    Label.NODULE_SOLID: (0.0, 80.0),
    Label.NODULE_GROUND_GLASS: (-750.0, -350.0),
}

#: Nominal HU ranges with contrast agent in the blood (``contrast=True``).
CONTRAST_HU_RANGES: Dict[Label, Tuple[float, float]] = {
    **HU_RANGES,
    Label.VESSEL: (150.0, 320.0),
    Label.HEART: (80.0, 320.0),  # enhanced myocardium and blood pool
    Label.AORTA: (150.0, 320.0),
}

_Z_SLAB = 45.0  # mm: tubes grow within |z| < this; the model holds for stacks within +-40 mm
_BODY_RADIUS = 172.0  # mm: the body fits in this circle about the centre of the field of view
_REFERENCE_FOV = 358.4  # mm: fields of view at least this wide show the anatomy unscaled


@dataclass(frozen=True)
class Nodule:
    """A lung nodule of a phantom.

    Attributes:
        center_mm: centre ``(x, y)`` in mm in the image frame (x along columns, y along
            rows, origin at the centre of pixel ``[0, 0]``).
        diameter_mm: sphere diameter in mm.
        kind: ``"solid"`` or ``"ground-glass"``.
        index: its value in :attr:`Phantom.nodule_map` (1..n).
        z_mm: centre along the stack in mm from the centre of slice 0 (0 for a single slice).
    """

    center_mm: Tuple[float, float]
    diameter_mm: float
    kind: str
    index: int
    z_mm: float = 0.0


@dataclass(frozen=True)
class Phantom:
    """A rendered chest phantom: the "true anatomy" a CT simulator projects.

    Attributes:
        hu: float32 HU, ``(H, W)`` or ``(Z, H, W)``.
        labels: uint8 :class:`Label` of the dominant tissue of each pixel, same shape.
        nodule_map: int16, 0 outside nodules, ``k`` inside the nodule with index ``k``.
        nodules: one record per nodule (also those too far from every slice to show).
        spacing: voxel size ``(x, y, z)`` in mm.
        seed: the seed that drew the anatomy.
        contrast: whether the blood holds contrast agent.
    """

    hu: np.ndarray
    labels: np.ndarray
    nodule_map: np.ndarray
    nodules: Tuple[Nodule, ...]
    spacing: Tuple[float, float, float]
    seed: int
    contrast: bool

    def to_ctimage(self) -> CTImage:
        """The HU as a :class:`CTImage` in LPS with the field-of-view centre at the origin."""
        n_y, n_x = self.hu.shape[-2:]
        n_z = self.hu.shape[0] if self.hu.ndim == 3 else 1
        sx, sy, sz = self.spacing
        origin = (-(n_x - 1) / 2 * sx, -(n_y - 1) / 2 * sy, -(n_z - 1) / 2 * sz)
        return CTImage(self.hu, self.spacing, origin)


def chest_phantom(seed: int, size: int = 512, spacing: float = 0.7, contrast: bool = False) -> Phantom:
    """One axial chest slice of ``size`` x ``size`` pixels of ``spacing`` mm (deterministic in ``seed``).

    The anatomy of a seed is the same on every grid whose field of view (``size * spacing``)
    is at least 358.4 mm wide; a smaller field shows it scaled down to fit.
    """
    return chest_stack(seed, 1, size, spacing, 1.0, contrast)


def chest_stack(
    seed: int,
    n_slices: int,
    size: int = 512,
    spacing: float = 0.7,
    slice_thickness: float = 1.0,
    contrast: bool = False,
) -> Phantom:
    """``n_slices`` contiguous axial slices ``slice_thickness`` mm apart, centred on the
    slice of :func:`chest_phantom`; vessels, airways and ribs are tubes through ``z`` and
    nodules spheres centred within the stack."""
    if size < 8 or spacing <= 0 or n_slices < 1 or slice_thickness <= 0:
        raise ValueError("need size >= 8, n_slices >= 1 and positive spacing and slice thickness")
    scale = min(1.0, size * spacing / _REFERENCE_FOV)  # image mm per anatomy mm
    z_half = (n_slices - 1) / 2 * slice_thickness / scale
    anatomy = _Anatomy(int(seed), z_half)
    hu = np.empty((n_slices, size, size), np.float32)
    labels = np.empty((n_slices, size, size), np.uint8)
    nodule_map = np.empty((n_slices, size, size), np.int16)
    for k in range(n_slices):
        z = (k * slice_thickness - (n_slices - 1) / 2 * slice_thickness) / scale
        hu[k], labels[k], nodule_map[k] = _Slice(anatomy, size, spacing / scale, z, contrast).render()
    center = (size - 1) / 2 * spacing
    nodules = tuple(
        Nodule(
            center_mm=(float(center + n.x * scale), float(center + n.y * scale)),
            diameter_mm=float(2 * n.r * scale),
            kind=n.kind,
            index=i + 1,
            z_mm=float(n.z * scale + (n_slices - 1) / 2 * slice_thickness),
        )
        for i, n in enumerate(anatomy.nodules)
    )
    if n_slices == 1:
        hu, labels, nodule_map = hu[0], labels[0], nodule_map[0]
    return Phantom(hu, labels, nodule_map, nodules, (spacing, spacing, slice_thickness), int(seed), bool(contrast))


# ---------------------------------------------------------------------------------------
# Geometry helpers (mm; arrays broadcast)


def _smin(a, b, k):
    """Smooth union of two signed distances, blending over ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smax(a, b, k):
    """Smooth intersection of two signed distances."""
    return -_smin(-a, -b, k)


@dataclass(frozen=True)
class _Ellipse:
    """Ellipse with centre (cx, cy), semi-axes (a, b) in mm, ``a`` along ``angle`` (rad)."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0

    def sdf(self, x, y):
        """Approximate signed distance in mm (exact on the outline, first order near it)."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        dx, dy = x - self.cx, y - self.cy
        u, v = (dx * c + dy * s) / self.a, (dy * c - dx * s) / self.b
        q = np.sqrt(u * u + v * v)
        grad = np.sqrt((u / self.a) ** 2 + (v / self.b) ** 2) / np.maximum(q, 1e-6)
        return (q - 1.0) / np.maximum(grad, 1.0 / max(self.a, self.b))

    def grown(self, margin: float) -> "_Ellipse":
        return replace(self, a=self.a + margin, b=self.b + margin)

    def at(self, u: float, v: float) -> Tuple[float, float]:
        """The point at (u, v) semi-axes along the ellipse's own axes."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        return self.cx + u * self.a * c - v * self.b * s, self.cy + u * self.a * s + v * self.b * c

    def radius(self, theta: float) -> float:
        """Distance from the centre to the outline in direction ``theta`` (rad)."""
        t = theta - self.angle
        return 1.0 / np.hypot(np.cos(t) / self.a, np.sin(t) / self.b)


def _circle(cx, cy, r) -> _Ellipse:
    return _Ellipse(cx, cy, r, r)


def _capsule_sdf(x, y, p, q, r):
    """Signed distance to the 2D segment p-q thickened by radius r (mm)."""
    d = np.subtract(q, p)
    t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / (d @ d), 0.0, 1.0)
    return np.hypot(x - p[0] - t * d[0], y - p[1] - t * d[1]) - r


def _bump(phi, center, width):
    """Raised-cosine bump of height 1 over ``center +- width`` (rad) on the circle."""
    t = np.angle(np.exp(1j * (phi - center))) / width
    return np.where(np.abs(t) < 1, 0.5 + 0.5 * np.cos(np.pi * t), 0.0)


def _airway_wall(r):
    """Wall thickness (mm) of an airway of lumen radius ``r`` mm."""
    return 0.2 * r + 0.3


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _grow_tree(rng, p, d, r, *, r_min, inside, steer=None, length=(6.0, 10.0), taper=0.95):
    """Grow binary trees of tapering tubes, one generation at a time.

    ``p`` (n, 3) root points in mm, ``d`` (n, 3) unit directions, ``r`` (n,) radii in mm.
    Each tube runs ``length`` radii and narrows by ``taper``; it then splits into a major
    and a minor child (Murray's law: r^3 = r1^3 + r2^3) bending away to opposite sides.
    Children thinner than ``r_min`` or starting where ``inside`` is False are dropped.
    Returns the tubes as (p0, p1, r0, r1).
    """
    tubes = []
    while len(p):
        n = len(p)
        q = p + d * (r * rng.uniform(*length, n))[:, None]
        r_end = r * taper
        tubes.append((p, q, r, r_end))
        f = rng.uniform(0.75, 0.97, n)
        radii = np.concatenate([r_end * f, r_end * np.cbrt(1.0 - f**3)])
        perp = rng.normal(size=(n, 3))
        perp = _unit(perp - (perp * d).sum(1, keepdims=True) * d)
        bend = np.concatenate([rng.uniform(0.15, 0.45, n), -rng.uniform(0.5, 1.1, n)])[:, None]
        d2 = np.concatenate([d, d]) * np.cos(bend) + np.concatenate([perp, perp]) * np.sin(bend)
        p2 = np.concatenate([q, q])
        if steer is not None:
            d2 = _unit(d2 + steer(p2))
        keep = (radii >= r_min) & inside(p2)
        p, d, r = p2[keep], d2[keep], radii[keep]
    return tuple(np.concatenate(parts) for parts in zip(*tubes))


# ---------------------------------------------------------------------------------------
# Anatomy: every random choice, in mm, independent of the grid


@dataclass(frozen=True)
class _Ball:
    x: float
    y: float
    z: float
    r: float
    kind: str
    hu: float


class _Field:
    """A 2D function sampled every ``step`` mm over the reference field, for fast queries
    at scattered points (bilinear) with its gradient."""

    def __init__(self, f: Callable, step: float = 3.0, half: float = 183.0):
        self.step, self.half = step, half
        c = np.arange(-half, half + step / 2, step)
        self.values = f(c[None, :], c[:, None])
        self.grad_y, self.grad_x = np.gradient(self.values, step)

    def _at(self, grid, x, y):
        index = [(y + self.half) / self.step, (x + self.half) / self.step]
        return map_coordinates(grid, index, order=1, mode="nearest")

    def __call__(self, x, y):
        return self._at(self.values, x, y)

    def grad(self, x, y):
        return self._at(self.grad_x, x, y), self._at(self.grad_y, x, y)


class _Anatomy:
    """The thorax of one seed: outlines, tubes, bones, nodules and tissue HU."""

    def __init__(self, seed: int, z_half: float):
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
        self._draw_body(rngs[0])
        self._draw_mediastinum(rngs[1])
        self._draw_bones(rngs[2])
        self.lung = _Field(self.lung_sdf)
        self._draw_airways(rngs[3])
        self._draw_vessels(rngs[4])
        self._draw_nodules(rngs[5], z_half)
        self._draw_tissues(rngs[6])
        self.texture_coarse = _Waves(rngs[7], 96, (8.0, 40.0))
        self.texture_fine = _Waves(rngs[7], 96, (2.5, 8.0))

    # -- body, subcutaneous fat, chest-wall muscles and thoracic cavity: radii as functions of the polar angle
    def _draw_body(self, rng):
        size = rng.uniform(0.85, 1.12)
        a, b = 150 * size * rng.uniform(0.94, 1.06), 105 * size * rng.uniform(0.92, 1.08)
        phi = np.linspace(-np.pi, np.pi, 1025)  # the last sample repeats the first
        c, s = np.cos(phi), np.sin(phi)
        n = np.where(s > 0, rng.uniform(2.6, 3.4), rng.uniform(2.0, 2.4))  # flatter back
        r = (np.abs(c / a) ** n + np.abs(s / b) ** n) ** (-1.0 / n)
        for k in (2, 3, 4, 5):
            r *= 1 + rng.normal(0, 0.025 / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        fat = rng.uniform(3, 10) + 45 * (size - 0.85)
        fat = fat * (1 + rng.uniform(0, 0.4) * np.cos(2 * phi) + rng.uniform(-0.2, 0.3) * s)
        back, front = np.clip(s, 0, 1) ** 2, np.clip(-s, 0, 1) ** 2
        wall = rng.uniform(16, 22) + rng.uniform(16, 26) * back + rng.uniform(3, 10) * front  # to the pleura
        cx, cy = rng.uniform(-12, 12), rng.uniform(-14, 10)
        extent = np.max(np.hypot(cx + r * c, cy + r * s))
        if extent > _BODY_RADIUS:  # shrink to fit the field of view
            k = _BODY_RADIUS / extent
            r, fat, wall, cx, cy = r * k, fat * k, wall * k, cx * k, cy * k
        # chest-wall muscles: a layer over the ribs thickened by pectoral, latissimus and back muscles
        bulk = np.zeros_like(phi)
        for side in (-1, 1):  # side +1 is the patient's left (+x)
            pectoral = (-np.pi / 2 + side * rng.uniform(0.45, 0.75), (0.35, 0.55), (8, 16))
            latissimus = (np.pi / 2 - side * rng.uniform(0.9, 1.25), (0.3, 0.5), (5, 12))
            for center, width, thick in (pectoral, latissimus):
                bulk = np.maximum(bulk, rng.uniform(*thick) * _bump(phi, center, rng.uniform(*width)))
        bulk = np.maximum(bulk, rng.uniform(30, 45) * _bump(phi, np.pi / 2, rng.uniform(0.5, 0.65)))  # back muscles
        muscle = np.minimum(r - fat, r - fat - wall + rng.uniform(9, 12) + bulk)
        self.cx, self.cy, self.a, self.b = cx, cy, a, b
        self.body_box = tuple((v.min(), v.max()) for v in (cx + r * c, cy + r * s))  # (x, y) ranges in mm
        self._phi = phi
        self._radii = np.stack([r, r - fat, muscle, r - fat - wall])  # skin, under the fat, muscle, pleura

    def layers(self, x, y):
        """Signed distances (mm) to the skin, to the inner border of subcutaneous fat, to the
        chest-wall muscles and to the thoracic cavity."""
        dx, dy = x - self.cx, y - self.cy
        rho, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
        return [rho - np.interp(phi, self._phi, r) for r in self._radii]

    def cavity_radius(self, phi):
        return np.interp(np.angle(np.exp(1j * phi)), self._phi, self._radii[3])

    def cavity_point(self, phi, depth=0.0):
        """The point (x, y) at ``depth`` mm outside the cavity border in direction ``phi``."""
        r = self.cavity_radius(phi) + depth
        return self.cx + r * np.cos(phi), self.cy + r * np.sin(phi)

    # -- mediastinum: heart, aortas, oesophagus; spine position
    def _draw_mediastinum(self, rng):
        cx, cy, a, b = self.cx, self.cy, self.a, self.b
        v = _Ellipse(cx + rng.uniform(-2, 2), cy + b * rng.uniform(0.28, 0.36), rng.uniform(16, 20),
                     rng.uniform(13, 16))
        self.vertebra = v  # its body
        r_ao = rng.uniform(10, 13.5)
        theta = np.radians(rng.uniform(-75, -45))
        dist = v.radius(theta) + r_ao + rng.uniform(1, 3)
        self.aorta = _circle(v.cx + dist * np.cos(theta), v.cy + dist * np.sin(theta), r_ao)
        r_es = rng.uniform(6, 8.5)
        x_es = min(v.cx + rng.uniform(-6, 2), self.aorta.cx - r_ao - r_es - 2)
        self.oesophagus = es = _circle(x_es, v.cy - v.b - r_es - rng.uniform(3, 6), r_es)
        r_tr = rng.uniform(7.5, 9.5)  # the trachea's lumen, right of the oesophagus
        outer = r_tr + _airway_wall(r_tr)
        self.trachea = _circle(es.cx - es.a - outer - rng.uniform(1, 3), es.cy - rng.uniform(3, 8), r_tr)
        heart = _Ellipse(
            cx + a * rng.uniform(0.06, 0.14), cy - b * rng.uniform(0.12, 0.22),
            a * rng.uniform(0.34, 0.40), b * rng.uniform(0.36, 0.44), np.radians(rng.uniform(-45, -25)),
        )
        self.heart_fat = rng.uniform(2, 6)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        for _ in range(50):  # keep the heart and its fat inside the cavity, in front of the spine and trachea
            x, y = heart.grown(self.heart_fat + 4).at(np.cos(t), np.sin(t))
            behind = np.max(y) > v.cy - v.b - 12
            clear = heart.grown(self.heart_fat + 2).sdf(self.trachea.cx, self.trachea.cy) > outer
            if np.max(self.layers(x, y)[3]) < 0 and clear and not behind:
                break
            heart = replace(heart, a=heart.a * 0.97, b=heart.b * 0.97, cy=heart.cy - behind)
        self.heart = heart
        self.chambers = (  # left and right ventricle, left atrium
            _Ellipse(*heart.at(0.1, 0.3), heart.a * 0.5, heart.b * 0.38, heart.angle),
            _Ellipse(*heart.at(0.05, -0.45), heart.a * 0.55, heart.b * 0.3, heart.angle),
            _Ellipse(*heart.at(-0.55, 0.55), heart.a * 0.3, heart.b * 0.3, heart.angle),
        )
        r_asc = rng.uniform(13, 17)
        self.ascending = _circle(*heart.at(-0.75, -0.7), r_asc) if rng.uniform() < 0.6 else None
        front = self.cavity_point(-np.pi / 2)
        column = rng.uniform(7, 13)
        parts = [heart.grown(self.heart_fat + 3), self.aorta.grown(3), es.grown(3),
                 self.trachea.grown(outer - r_tr + 2)]
        if self.ascending is not None:
            parts.append(self.ascending.grown(3))
        self._mediastinum = (parts, ((front[0], front[1] - 10), (v.cx, v.cy)), column)

    def mediastinum_sdf(self, x, y):
        parts, (p, q), column = self._mediastinum
        d = _capsule_sdf(x, y, p, q, column)
        for e in parts:
            d = _smin(d, e.sdf(x, y), 10.0)
        for e in self._spine_parts:
            d = _smin(d, e.sdf(x, y), 6.0)
        return d

    def lung_sdf(self, x, y):
        """Signed distance (mm) to the lungs: the cavity less the mediastinum, with round corners.
        ``x`` (1, W) and ``y`` (H, 1) grids or points; on grids the mediastinum is computed
        only near the midline."""
        cavity = self.layers(x, y)[3]
        if np.ndim(x) == 2 and x.shape[0] == 1 and y.shape[1] == 1:
            cols = np.nonzero(np.abs(x[0] - self.cx) < self._mediastinum_half)[0]
            if len(cols) == 0:
                return cavity
            win = (slice(None), slice(cols[0], cols[-1] + 1))
            cavity[win] = _smax(cavity[win], -self.mediastinum_sdf(x[win], y), 8.0)
            return cavity
        return _smax(cavity, -self.mediastinum_sdf(x, y), 8.0)

    # -- bones: spine, sternum, ribs
    def _draw_bones(self, rng):
        v = self.vertebra
        canal = _Ellipse(v.cx, v.cy + v.b + rng.uniform(7, 9), rng.uniform(8, 10), rng.uniform(7, 8.5))
        arch = canal.grown(rng.uniform(4, 6))
        spine_len = rng.uniform(20, 30)
        spinous = _Ellipse(arch.cx, arch.cy + arch.b + spine_len / 2 - 3, spine_len / 2, rng.uniform(3.5, 5),
                           np.radians(90 + rng.uniform(-8, 8)))
        transverse = [
            _Ellipse(arch.cx + s * (arch.a + rng.uniform(5, 9)), arch.cy - rng.uniform(0, 4), rng.uniform(10, 13),
                     rng.uniform(4, 5.5), s * np.radians(rng.uniform(15, 30)))
            for s in (-1, 1)
        ]
        self.cortex = rng.uniform(1.2, 2.0)
        self.processes, self.arch, self.canal = (spinous, *transverse), arch, canal
        self._spine_parts = (v.grown(4), arch.grown(4), *[t.grown(3) for t in transverse])
        self._mediastinum_half = max(
            max(abs(e.cx - self.cx) + max(e.a, e.b) for e in self._mediastinum[0] + list(self._spine_parts)),
            self._mediastinum[2]) + 10
        front = self.cavity_point(-np.pi / 2)
        sternum_b = rng.uniform(5, 7)
        self.sternum = _Ellipse(front[0] + rng.uniform(-3, 3), front[1] - sternum_b - 1.5, rng.uniform(12, 18),
                                sternum_b)
        self.sternum_cortex = rng.uniform(1.0, 1.5)
        # ribs: tubes sloping down along the chest wall, from the spine to the front
        slope, pitch = rng.uniform(0.38, 0.5), rng.uniform(22, 28)
        p0, p1, radius, cortex = [], [], [], []
        for side in (-1, 1):
            psi = np.linspace(np.radians(rng.uniform(22, 28)), np.radians(rng.uniform(140, 155)), 28)
            phi = np.pi / 2 - side * psi
            xy = np.stack(self.cavity_point(phi, rng.uniform(3.5, 5)), 1)
            arc = np.concatenate([[0], np.cumsum(np.hypot(*np.diff(xy, axis=0).T))])
            for z_top in rng.uniform(0, pitch) + pitch * np.arange(-3, 10):
                z = z_top - slope * arc
                if z[0] < -_Z_SLAB - 10 or z[-1] > _Z_SLAB + 10:
                    continue
                pts = np.column_stack([xy, z])
                p0.append(pts[:-1]), p1.append(pts[1:])
                radius.append(np.full(len(pts) - 1, rng.uniform(2.8, 3.6)))
                cortex.append(np.full(len(pts) - 1, rng.uniform(0.9, 1.3)))
        self.ribs = np.concatenate(p0), np.concatenate(p1), np.concatenate(radius), np.concatenate(cortex)

    # -- airways: trachea, main bronchi and a tree of bronchi into the lungs
    def _draw_airways(self, rng):
        tr = self.trachea
        carina = np.array([tr.cx, tr.cy, rng.uniform(-10, 40)])  # 1 in 5 slices at z = 0 show the trachea
        p0, p1, r0, r1 = [carina + [0, 0, 120]], [carina], [tr.a], [tr.a]
        roots, dirs, radii = [], [], []
        for side, angle, forward, length, ratio in ((-1, (20, 30), (-0.15, 0), (15, 25), (0.65, 0.75)),
                                                    (1, (40, 50), (0.2, 0.4), (35, 45), (0.55, 0.65))):
            t = np.radians(rng.uniform(*angle))
            d = _unit(np.array([side * np.sin(t), -rng.uniform(*forward), -np.cos(t)]))
            end = carina + d * rng.uniform(*length)
            r = tr.a * rng.uniform(*ratio)
            p0.append(carina), p1.append(end), r0.append(r), r1.append(r * 0.95)  # main bronchus
            roots.append(end), dirs.append(d), radii.append(r * 0.95)
        heart = self.heart.grown(2)

        def inside(p):
            x, y = p[:, 0], p[:, 1]
            return (self.layers(x, y)[3] < -2) & (heart.sdf(x, y) > 0) & (np.abs(p[:, 2]) < _Z_SLAB + 20)

        tree = _grow_tree(rng, np.array(roots), np.array(dirs), np.array(radii), r_min=0.8, inside=inside,
                          steer=self._steer, length=(4.0, 7.0))
        p0, p1, r0, r1 = (np.concatenate([np.array(a, float), b]) for a, b in zip((p0, p1, r0, r1), tree))
        # drop the bronchi that would pass through the heart (above this slab they pass over it)
        t = np.linspace(0, 1, 9)[:, None, None]
        x, y = np.moveaxis(p0[None, :, :2] + t * (p1 - p0)[None, :, :2], 2, 0)
        r = np.maximum(r0, r1) + _airway_wall(np.maximum(r0, r1))
        keep = np.all(self.heart.grown(self.heart_fat).sdf(x, y) > r, axis=0)
        self.airways = p0[keep], p1[keep], r0[keep], r1[keep]

    def _steer(self, p):
        """Pull of tubes near the pleura back into the lungs (a vector per point)."""
        x, y = p[:, 0], p[:, 1]
        pull = 1.5 * np.clip((self.lung(x, y) + 15) / 15, 0, 1)
        gx, gy = self.lung.grad(x, y)
        return -pull[:, None] * np.stack([gx, gy, np.zeros_like(gx)], 1)

    # -- pulmonary vessels: trees from each hilum, and sub-trees whose stems lie outside the slab
    def _draw_vessels(self, rng):
        roots, dirs, radii = [], [], []
        for side in (-1, 1):
            xs = self.cx + side * np.linspace(0, self.a, 151)
            y = self.cy + self.b * rng.uniform(-0.05, 0.1)
            hilum = np.array([xs[np.argmax(self.lung(xs, np.full_like(xs, y)) < -4)], y, 0.0])
            n = rng.integers(6, 10)
            roots.append(hilum + rng.normal(0, [3, 12, 15], (n, 3)))
            dirs.append(np.column_stack([side * rng.uniform(0.3, 1, n), rng.normal(0, 0.6, (n, 2))]))
            radii.append(rng.uniform(3.5, 5.0, n))
            # sub-trees across the lung, as wide as their distance from the hilum allows
            n = 600
            p = np.column_stack([self.cx + side * self.a * rng.uniform(0, 1, n),
                                 self.cy + self.b * rng.uniform(-1, 1, n), rng.uniform(-_Z_SLAB, _Z_SLAB, n)])
            p = p[self.lung(p[:, 0], p[:, 1]) < -2]
            dist = np.linalg.norm(p - hilum, axis=1)
            roots.append(p)
            dirs.append(p - hilum + rng.normal(0, 25, p.shape))
            radii.append(0.6 + 3.0 * np.clip(1 - dist / 140, 0, 1) ** 1.5 * rng.uniform(0.6, 1.1, len(p)))

        def inside(p):
            return (self.lung(p[:, 0], p[:, 1]) < -0.5) & (np.abs(p[:, 2]) < _Z_SLAB)

        roots = np.concatenate(roots)
        keep = inside(roots)
        self.vessels = _grow_tree(rng, roots[keep], _unit(np.concatenate(dirs))[keep], np.concatenate(radii)[keep],
                                  r_min=0.5, inside=inside, steer=self._steer, length=(5.0, 9.0))

    # -- nodules: spheres well inside the lungs, apart from each other
    def _draw_nodules(self, rng, z_half):
        balls = []
        for _ in range(rng.integers(0, 7)):
            r = np.exp(rng.uniform(np.log(1.0), np.log(7.5)))
            kind = "solid" if rng.uniform() < 0.6 else "ground-glass"
            hu = rng.uniform(25, 55) if kind == "solid" else rng.uniform(-650, -450)
            x = self.cx + self.a * rng.uniform(-0.9, 0.9, 64)
            y = self.cy + self.b * rng.uniform(-0.9, 0.9, 64)
            ok = self.lung(x, y) < -(r + 3)
            for o in balls:
                ok &= np.hypot(x - o.x, y - o.y) > r + o.r + 4
            if ok.any():
                i = np.argmax(ok)
                balls.append(_Ball(float(x[i]), float(y[i]), z_half * rng.uniform(-1, 1), r, kind, hu))
        self.nodules = tuple(balls)

    # -- nominal HU of each tissue: (HU, coarse texture amplitude, fine texture amplitude)
    def _draw_tissues(self, rng):
        blood = rng.uniform(35, 45)
        self.tissue = {
            "fat": (rng.uniform(-110, -90), 6.0, 3.0),
            "muscle": (rng.uniform(40, 55), 5.0, 3.0),
            "cord": (rng.uniform(28, 38), 2.0, 2.0),
            "lung": (rng.uniform(-875, -835), 12.0, 20.0),
            "blood": (blood, 2.0, 1.5),
            "myocardium": (blood + rng.uniform(3, 8), 2.0, 1.5),
            "trabecular": (rng.uniform(230, 330), 15.0, 35.0),
            "cortical": (rng.uniform(1000, 1300), 30.0, 40.0),
            "air": (-1000.0, 0.0, 0.0),
        }
        self.contrast_tissue = {
            "blood": (rng.uniform(180, 290), 4.0, 3.0),
            "myocardium": (rng.uniform(95, 130), 4.0, 3.0),
        }
        self.lung_gravity = rng.uniform(20, 45)  # HU denser from front to back over b


class _Waves:
    """Smooth random texture of zero mean and unit variance: a sum of ``n`` plane waves
    with random 3D directions and wavelengths (mm) in ``wavelengths``."""

    def __init__(self, rng, n: int, wavelengths: Tuple[float, float]):
        k = 2 * np.pi / np.exp(rng.uniform(*np.log(wavelengths), n))
        self.k = _unit(rng.normal(size=(n, 3))) * k[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, n)
        self.amp = np.sqrt(2.0 / n)

    def __call__(self, x, y, z):
        """The texture on the grid of column positions ``x`` and row positions ``y`` (mm) at ``z``."""
        kx, ky, kz = self.k.T
        ax = np.outer(x, kx) + (kz * z + self.phase)
        ay = np.outer(y, ky)
        rows = np.concatenate([np.cos(ay), -np.sin(ay)], 1).astype(np.float32)
        cols = (self.amp * np.concatenate([np.cos(ax), np.sin(ax)], 1)).astype(np.float32)
        return np.einsum("ik,jk->ij", rows, cols)  # no BLAS: deterministic and no thread stalls


# ---------------------------------------------------------------------------------------
# Rendering one slice


class _Slice:
    """Paints the anatomy at height ``z`` (mm) on a ``size`` x ``size`` grid of ``pixel`` mm
    (anatomy mm), within the bounding box of the body (air elsewhere)."""

    def __init__(self, anatomy: _Anatomy, size: int, pixel: float, z: float, contrast: bool):
        self.an, self.size, self.px, self.z = anatomy, size, pixel, z
        coords = ((np.arange(size) - (size - 1) / 2) * pixel).astype(np.float32)
        (x_lo, x_hi), (y_lo, y_hi) = anatomy.body_box
        cols = np.nonzero((coords > x_lo - 2 * pixel) & (coords < x_hi + 2 * pixel))[0]
        rows = np.nonzero((coords > y_lo - 2 * pixel) & (coords < y_hi + 2 * pixel))[0]
        self.box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        self.x, self.y = coords[self.box[1]], coords[self.box[0]]
        self.shape = (len(self.y), len(self.x))
        self.hu = np.full(self.shape, -1000.0, np.float32)
        self.labels = np.zeros(self.shape, np.uint8)
        self.nodule_map = np.zeros(self.shape, np.int16)
        self.tissue = {**anatomy.tissue, **(anatomy.contrast_tissue if contrast else {})}
        self.coarse = anatomy.texture_coarse(self.x, self.y, z)
        self.fine = anatomy.texture_fine(self.x, self.y, z)

    def render(self):
        """The slice as (HU, labels, nodule map) on the whole grid."""
        an = self.an
        box = (slice(None), slice(None))
        x, y = self.x[None, :], self.y[:, None]
        skin, under_fat, muscle, pleura = an.layers(x, y)
        self.paint(box, self._alpha(skin), "fat", Label.FAT)
        self.paint(box, self._alpha(muscle), "muscle", Label.SOFT_TISSUE)
        cavity = self._alpha(pleura)
        self.paint(box, cavity, "fat", Label.FAT)
        lung = self._alpha(an.lung_sdf(x, y))
        self.paint(box, lung, "lung", Label.LUNG)
        self.paint(box, self._tubes(*an.vessels) * lung, "blood", Label.VESSEL)
        p0, p1, r0, r1 = an.airways
        wall = self._tubes(p0, p1, r0 + _airway_wall(r0), r1 + _airway_wall(r1))
        self.paint(box, wall * cavity, "muscle", Label.SOFT_TISSUE)
        self.paint(box, self._tubes(p0, p1, r0, r1) * cavity, "air", Label.AIRWAY)
        self.ellipse(an.heart, "myocardium", Label.HEART)
        for chamber in an.chambers:
            self.ellipse(chamber, "blood", Label.HEART)
        for aorta in (an.aorta, an.ascending):
            if aorta is not None:
                self.ellipse(aorta.grown(1.5), "fat", Label.FAT)
                self.ellipse(aorta, "blood", Label.AORTA)
        self.ellipse(an.oesophagus, "muscle", Label.SOFT_TISSUE)
        for bone in (*an.processes, an.arch):
            self.bone(bone, an.cortex)
        self.ellipse(an.canal, "cord", Label.SOFT_TISSUE)
        self.bone(an.vertebra, an.cortex)
        self.bone(an.sternum, an.sternum_cortex)
        p0, p1, r, cortex = an.ribs
        self.paint(box, self._tubes(p0, p1, r, r), "cortical", Label.CORTICAL_BONE)
        self.paint(box, self._tubes(p0, p1, r - cortex, r - cortex), "trabecular", Label.TRABECULAR_BONE)
        for k, ball in enumerate(an.nodules, 1):
            self.nodule(ball, k)
        out = (np.full((self.size, self.size), -1000.0, np.float32), np.zeros((self.size, self.size), np.uint8),
               np.zeros((self.size, self.size), np.int16))
        for full, part in zip(out, (self.hu, self.labels, self.nodule_map)):
            full[self.box] = part
        return out

    # -- painting
    def _alpha(self, sdf, edge=None):
        return np.clip(0.5 - sdf / (edge or self.px), 0.0, 1.0)

    def _value(self, tissue, win):
        hu, coarse, fine = self.tissue[tissue]
        value = hu + coarse * self.coarse[win] + fine * self.fine[win]
        if tissue == "lung":
            value += self.an.lung_gravity * (self.y[win[0], None] - self.an.cy) / self.an.b
        return value

    def paint(self, win, alpha, tissue, label, value=None):
        """Blend ``tissue`` (or HU ``value``) over the window ``win`` by ``alpha``; returns
        where the structure dominates (alpha >= 0.5)."""
        hu = self.hu[win]
        hu *= 1.0 - alpha  # exact where alpha is 0 or 1
        hu += alpha * (self._value(tissue, win) if value is None else value)
        dominant = alpha >= 0.5
        self.labels[win][dominant] = label
        return dominant

    def _index(self, x, y):
        """Fractional (column, row) indices in the box of points (x, y) mm."""
        return (x - self.x[0]) / self.px, (y - self.y[0]) / self.px

    def ellipse_window(self, e: _Ellipse):
        """Index window (rows, columns) of the box covering the ellipse ``e``."""
        half = max(e.a, e.b) / self.px + 2
        center = self._index(e.cx, e.cy)[::-1]  # row, column
        return tuple(slice(int(np.clip(np.floor(c - half), 0, n)), int(np.clip(np.ceil(c + half) + 1, 0, n)))
                     for c, n in zip(center, self.shape))

    def ellipse(self, e: _Ellipse, tissue, label, inset=0.0):
        win = self.ellipse_window(e)
        self.paint(win, self._alpha(e.sdf(self.x[None, win[1]], self.y[win[0], None]) + inset), tissue, label)

    def bone(self, e: _Ellipse, cortex):
        """Cortical shell ``cortex`` mm thick over trabecular bone."""
        self.ellipse(e, "cortical", Label.CORTICAL_BONE)
        self.ellipse(e, "trabecular", Label.TRABECULAR_BONE, inset=cortex)

    def nodule(self, ball: _Ball, index: int):
        win = self.ellipse_window(_circle(ball.x, ball.y, ball.r + self.px))
        dz = ball.z - self.z
        rho = np.hypot(self.x[None, win[1]] - ball.x, self.y[win[0], None] - ball.y)
        dist = np.sqrt(rho**2 + dz**2)
        sdf = (dist - ball.r) / np.maximum(rho / np.maximum(dist, 1e-6), 0.25)  # in-plane distance
        solid = ball.kind == "solid"
        alpha = self._alpha(sdf, self.px if solid else max(self.px, 1.5))  # hazy edge of ground glass
        value = ball.hu + (4.0 if solid else 15.0) * self.fine[win]
        inside = self.paint(win, alpha, None, Label.NODULE_SOLID if solid else Label.NODULE_GROUND_GLASS, value)
        self.nodule_map[win][inside] = index

    def _tubes(self, p0, p1, r0, r1):
        """Partial-volume coverage (box) of the union of cone segments p0-p1 (n, 3) mm of
        radii r0-r1 mm, where they cross the slice."""
        out = np.zeros(self.shape, np.float32)
        px, z = self.px, self.z
        reach = np.maximum(r0, r1) + px
        z0, dz = p0[:, 2], p1[:, 2] - p0[:, 2]
        flat = np.abs(dz) < 1e-9
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (z - reach - z0) / dz, (z + reach - z0) / dz
        t_lo = np.maximum(np.where(flat, np.where(np.abs(z0 - z) <= reach, 0.0, 2.0), np.minimum(ta, tb)), 0.0)
        t_hi = np.minimum(np.where(flat, 1.0, np.maximum(ta, tb)), 1.0)
        ends = [p0[:, :2] + t[:, None] * (p1[:, :2] - p0[:, :2]) for t in (t_lo, t_hi)]
        first = np.stack(self._index(*(np.minimum(*ends) - reach[:, None]).T), 1)
        last = np.stack(self._index(*(np.maximum(*ends) + reach[:, None]).T), 1)
        limit = np.array(self.shape[::-1])  # columns, rows
        lo = np.clip(np.ceil(first), 0, limit).astype(int)
        hi = np.clip(np.floor(last), -1, limit - 1).astype(int)
        keep = np.nonzero((t_lo <= t_hi) & np.all(hi >= lo, axis=1))[0]
        if len(keep) == 0:
            return out
        lo, size = lo[keep], hi[keep] - lo[keep] + 1
        count = size[:, 0] * size[:, 1]
        which = np.repeat(np.arange(len(keep)), count)  # (segment, pixel) pairs
        local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        col = lo[which, 0] + local % size[which, 0]
        row = lo[which, 1] + local // size[which, 0]
        seg = keep[which]
        a, d = p0[seg], p1[seg] - p0[seg]
        qx, qy, qz = self.x[col] - a[:, 0], self.y[row] - a[:, 1], z - a[:, 2]
        dd = (d * d).sum(1)
        t = np.clip((qx * d[:, 0] + qy * d[:, 1] + qz * d[:, 2]) / np.where(dd > 0, dd, 1.0), 0.0, 1.0)
        vx, vy, vz = qx - t * d[:, 0], qy - t * d[:, 1], qz - t * d[:, 2]
        rho = np.hypot(vx, vy)
        dist = np.sqrt(rho * rho + vz * vz)
        r = r0[seg] + t * (r1[seg] - r0[seg])
        r_eff = np.maximum(r, px / 2)  # thinner tubes: a pixel-wide profile, scaled down
        in_plane = np.where(dist > 1e-6, rho / np.maximum(dist, 1e-6), 1.0)  # distance in the slice
        alpha = np.clip(0.5 - (dist - r_eff) / np.maximum(in_plane, 0.25) / px, 0.0, 1.0) * (r / r_eff)
        np.maximum.at(out.reshape(-1), row * self.shape[1] + col, alpha.astype(np.float32))
        return out
