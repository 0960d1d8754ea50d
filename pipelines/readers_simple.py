"""Re-export of :mod:`segcore.readers.simple`."""

from segcore.readers.simple import PilSource, ZarrSource, check_chunk_grid, open_pil, open_zarr  # noqa: F401
