"""Re-export of :mod:`segcore.readers` (the reader layer moved to segcore so that training and
``gigaseg segment`` read pixels through the same sources)."""

from segcore.readers import (  # noqa: F401
    READERS,
    SAMPLE_BLOCK,
    SAMPLE_PIXELS,
    ImageSource,
    open_source,
    open_sources,
    reader_name,
    register_reader,
    safe_name,
    supported_suffixes,
)
