"""Re-export of :mod:`segcore.readers.fits`."""

from segcore.readers.fits import FIX, FitsSource, open_fits  # noqa: F401
