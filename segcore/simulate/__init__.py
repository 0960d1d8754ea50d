"""Synthetic datasets for demos and tests: ``gigaseg simulate {sem,ccd,shapes,lines}``.

* :func:`generate_shapes`, :func:`generate_lines`, :func:`generate_sem`, :func:`generate_ccd` write
  dataset folders.
* :func:`render_sem` renders any window of a huge, consistent SEM image;
  :func:`write_sem_bigtiff` writes gigapixel tiled BigTIFFs with flat memory.
* :func:`write_ccd_fits` writes one multi-amplifier FITS and returns its label maps.
"""

from segcore.simulate.ccd import generate_ccd, render_ccd_amplifier, write_ccd_fits
from segcore.simulate.lines import generate_lines, render_lines
from segcore.simulate.sem import generate_sem, render_sem, render_sem_minerals, write_sem_bigtiff
from segcore.simulate.shapes import generate_shapes, render_shapes

__all__ = [
    "generate_ccd",
    "generate_lines",
    "generate_sem",
    "generate_shapes",
    "render_ccd_amplifier",
    "render_lines",
    "render_sem",
    "render_sem_minerals",
    "render_shapes",
    "write_ccd_fits",
    "write_sem_bigtiff",
]
