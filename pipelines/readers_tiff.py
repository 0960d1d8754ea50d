"""Re-export of :mod:`segcore.readers.tiff`."""

from segcore.readers.tiff import FIX, TiffSource, check_chunks, open_tiff  # noqa: F401
