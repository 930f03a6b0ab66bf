"""InvarianceExplorer engine: sample and analyse the invariances of low-dose CT denoisers.

The engine works on CT images as numpy arrays in Hounsfield units (HU) with their
geometry in millimetres (:class:`CTImage`) and on denoisers as torch modules. It never
imports slicer, vtk or Qt; the 3D Slicer module and the CLI are thin layers above it.

Method: E. Eulig et al., "Reconstructing and analyzing the invariances of low-dose CT
image denoising networks", Medical Physics 52(1):188-200, 2025, doi:10.1002/mp.17413.
"""

__version__ = "0.1.0"

from .image import CTImage  # noqa: E402,F401
