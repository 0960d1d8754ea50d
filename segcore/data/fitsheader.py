"""FITS header cards as the normalisation sees them, with the INHERIT convention applied.

Multi-extension files often keep calibration keywords (PEDESTAL, GAIN, ...) in the primary
header only. Following the FITS INHERIT convention, an extension's cards come first and any
card it lacks is taken from the primary header, unless the extension says ``INHERIT = F``.
Structural cards (BITPIX, NAXISn, BZERO, ...) describe one HDU's data and are never inherited.
Training (``segcore.data.io``) and ``segment`` (``segcore.readers.fits``) both use this, so
a key is found the same way on both paths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_SKIP = {"COMMENT", "HISTORY", ""}
_STRUCTURAL = {"SIMPLE", "XTENSION", "BITPIX", "NAXIS", "EXTEND", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "BLANK",
               "EXTNAME", "EXTVER", "EXTLEVEL", "INHERIT", "CHECKSUM", "DATASUM", "GROUPS", "TFIELDS", "THEAP"}
_STRUCTURAL_RE = re.compile(r"^(NAXIS\d+|Z[A-Z]+\d*|T[A-Z]+\d+)$")  # axes, tile compression, table columns


def plain_cards(header: Mapping[str, Any]) -> dict[str, Any]:
    """Header cards as a JSON-friendly dict (commentary cards dropped)."""
    out: dict[str, Any] = {}
    for key, value in header.items():
        if key and key not in _SKIP:
            out[key] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


def inherited_header(hdu: Mapping[str, Any], primary: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cards of ``hdu``, completed from ``primary`` (INHERIT convention; see module doc)."""
    own = plain_cards(hdu)
    if primary is None or hdu is primary or own.get("INHERIT") is False:
        return own
    extra = {k: v for k, v in plain_cards(primary).items()
             if k not in own and k not in _STRUCTURAL and not _STRUCTURAL_RE.match(k)}
    return {**own, **extra}
