"""CCD frames like DAMIC's: multi-extension FITS in ADU, one image HDU per amplifier.

Each amplifier frame has a pedestal plus Gaussian read noise (class 0 background), an
amplifier glow band decaying away from one edge (1 glow, in ~60 % of amplifiers and at least
one per file), hot pixels and hot column segments (2 hot), and particle clusters (3 cluster):
diffusion-limited point deposits and short straight or wiggly tracks of a few hundred to
thousands of ADU. Labels mark where a component exceeds ~3 read-noise sigma; clusters win
over hot pixels over glow.

Headers carry ``EXTNAME`` (``AMP1``..), ``PEDESTAL`` (ADU), ``GAIN`` (electrons per ADU),
``RDNOISE`` (electrons) and ``BUNIT``; ``uint16`` data is stored as int16 + ``BZERO=32768``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy.special import erf

from segcore.data.spec import DatasetSpec
from segcore.errors import ConfigError
from segcore.simulate.common import prepare_dataset_dir, rng_for, write_spec

log = logging.getLogger(__name__)

CLASSES = ["background", "glow", "hot", "cluster"]
CcdDtype = Literal["uint16", "float32"]


@dataclass
class Amplifier:
    """One simulated amplifier frame: ADU values, labels and the calibration in its header."""

    adu: np.ndarray
    labels: np.ndarray
    pedestal: float
    gain: float  # electrons per ADU
    read_noise: float  # electrons


def _glow(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Glow in electrons: a band decaying from one edge, stronger towards one corner."""
    h, w = shape
    edge = int(rng.integers(4))
    length, depth = (h, w) if edge < 2 else (w, h)
    dist = np.arange(depth, dtype=np.float32)
    along = np.arange(length, dtype=np.float32)
    scale = rng.uniform(4.0, 14.0)
    amp = rng.uniform(25.0, 90.0)
    start = int(rng.integers(0, max(1, length // 3)))  # the band does not always start at the corner
    profile = amp * (0.35 + 0.65 * np.exp(-along / (0.6 * length))) * (along >= start)
    band = profile[:, None] * np.exp(-dist / scale)[None, :]  # (along, depth)
    band = band if edge % 2 == 0 else band[:, ::-1]
    return band if edge < 2 else band.T


def _hot(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Hot pixels and hot column segments in electrons."""
    h, w = shape
    hot = np.zeros(shape, np.float32)
    n = rng.poisson(4e-4 * h * w) + 1
    hot[rng.integers(0, h, n), rng.integers(0, w, n)] = rng.uniform(40.0, 600.0, n)
    for _ in range(int(rng.integers(1, 3))):
        col, top = int(rng.integers(0, w)), int(rng.integers(0, h // 2))
        hot[top:, col] += rng.uniform(10.0, 30.0)  # charge leaks towards the readout row
    return hot


def _splat(charge: np.ndarray, y: np.ndarray, x: np.ndarray, q: np.ndarray, sigma: float) -> None:
    """Add point charges ``q`` at sub-pixel positions, diffused by a Gaussian (pixel-integrated)."""
    h, w = charge.shape
    r = int(np.ceil(3 * sigma)) + 1
    for yy, xx, qq in zip(y, x, q, strict=True):
        r0, c0 = int(np.floor(yy)) - r, int(np.floor(xx)) - r
        edges_y = np.arange(r0, r0 + 2 * r + 2) - yy
        edges_x = np.arange(c0, c0 + 2 * r + 2) - xx
        fy = np.diff(erf(edges_y / (np.sqrt(2) * sigma))) / 2
        fx = np.diff(erf(edges_x / (np.sqrt(2) * sigma))) / 2
        stamp = qq * np.outer(fy, fx)
        ys, xs = slice(max(r0, 0), min(r0 + 2 * r + 1, h)), slice(max(c0, 0), min(c0 + 2 * r + 1, w))
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue  # wandered off the frame
        charge[ys, xs] += stamp[ys.start - r0: ys.stop - r0, xs.start - c0: xs.stop - c0]


def _clusters(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Particle clusters in electrons: diffused points, straight tracks and wiggly electron worms."""
    h, w = shape
    charge = np.zeros(shape, np.float32)
    for _ in range(rng.poisson(h * w / 3000) + 1):
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.3, 1.2)
        kind = rng.random()
        if kind < 0.6:  # point-like (X-rays, nuclear recoils, low-energy electrons)
            _splat(charge, np.array([y]), np.array([x]), np.array([np.exp(rng.uniform(np.log(60), np.log(3000)))]), sigma)
            continue
        n = int(rng.integers(8, 60))
        if kind < 0.8:  # straight track (muon)
            angle = rng.uniform(0, 2 * np.pi)
            t = np.arange(n) * 0.5
            ys, xs = y + t * np.sin(angle), x + t * np.cos(angle)
        else:  # wiggly electron track
            steps = rng.normal(0, 0.5, (n, 2)) + rng.normal(0, 0.3, 2)
            ys, xs = y + np.cumsum(steps[:, 0]), x + np.cumsum(steps[:, 1])
        _splat(charge, ys, xs, rng.uniform(20, 90, n), sigma)
    return charge


def render_ccd_amplifier(shape: tuple[int, int], rng: np.random.Generator, glow: bool) -> Amplifier:
    """Simulate one amplifier frame (float ADU) with its class labels 0..3."""
    pedestal = float(rng.uniform(2000.0, 12000.0))
    adu_per_e = float(rng.uniform(4.5, 7.0))
    noise_e = float(rng.uniform(1.5, 2.5))
    glow_e = _glow(shape, rng) if glow else np.zeros(shape, np.float32)
    hot_e, cluster_e = _hot(shape, rng), _clusters(shape, rng)
    threshold = 3.0 * noise_e
    labels = np.zeros(shape, np.uint8)
    labels[glow_e > threshold] = 1
    labels[hot_e > threshold] = 2
    labels[cluster_e > threshold] = 3
    signal = glow_e + hot_e + cluster_e
    row_drift = rng.normal(0, 0.3 * noise_e, (shape[0], 1))
    electrons = signal + row_drift + rng.normal(0, noise_e, shape)
    adu = (pedestal + adu_per_e * electrons).astype(np.float32)
    return Amplifier(adu, labels, pedestal, 1.0 / adu_per_e, noise_e)


def _hdu(amp: Amplifier, k: int, dtype: CcdDtype):  # -> fits.ImageHDU
    from astropy.io import fits

    data = np.clip(np.rint(amp.adu), 0, 65535).astype(np.uint16) if dtype == "uint16" else amp.adu
    hdu = fits.ImageHDU(data=data, name=f"AMP{k + 1}")
    hdu.header["PEDESTAL"] = (round(amp.pedestal, 3), "baseline level [ADU]")
    hdu.header["GAIN"] = (round(amp.gain, 6), "electrons per ADU")
    hdu.header["RDNOISE"] = (round(amp.read_noise, 4), "read noise [electrons]")
    hdu.header["BUNIT"] = "ADU"
    return hdu


def write_ccd_fits(path: str | Path, n_hdus: int = 4, height: int = 256, width: int = 256,
                   seed: int = 0, dtype: CcdDtype = "uint16") -> list[np.ndarray]:
    """Write a multi-extension FITS (empty primary + ``n_hdus`` amplifier HDUs ``AMP1``..)
    and return the ground-truth uint8 label map of each amplifier, in HDU order."""
    from astropy.io import fits

    if n_hdus < 1 or height < 8 or width < 8:
        raise ConfigError(f"need n_hdus >= 1 and a size of at least 8x8, got {n_hdus}, {height}x{width}")
    rng = rng_for(seed, 0)
    glows = rng.random(n_hdus) < 0.6
    glows[int(rng.integers(n_hdus))] = True  # at least one glowing amplifier per file
    primary = fits.PrimaryHDU()
    primary.header["NAMPS"] = (n_hdus, "amplifier image HDUs")
    primary.header["ORIGIN"] = "gigaseg simulate ccd"
    primary.header["SIMSEED"] = seed
    hdus, masks = [primary], []
    for k in range(n_hdus):
        amp = render_ccd_amplifier((height, width), rng_for(seed, k + 1), bool(glows[k]))
        hdus.append(_hdu(amp, k, dtype))
        masks.append(amp.labels)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return masks


def generate_ccd(out: str | Path, n: int, size: int = 256, seed: int = 0, n_hdus: int = 2,
                 dtype: CcdDtype = "uint16") -> Path:
    """Write ``n`` multi-HDU FITS frames with per-HDU PNG masks ``<stem>_AMP<k>.png`` and a
    dataset.yaml that normalises with the header calibration (``fits_header``)."""
    if n < 1 or size < 16:
        raise ConfigError(f"need n >= 1 and size >= 16, got n={n}, size={size}")
    images, masks = prepare_dataset_dir(out)
    for i in range(n):
        labels = write_ccd_fits(images / f"ccd_{i:04d}.fits", n_hdus, size, size,
                                int(rng_for(seed, i).integers(2**31)), dtype)
        for k, lab in enumerate(labels):
            Image.fromarray(lab).save(masks / f"ccd_{i:04d}_AMP{k + 1}.png")
    spec = DatasetSpec(class_names=CLASSES, normalize={"mode": "fits_header"},
                       description=f"gigaseg simulate ccd: {n} files x {n_hdus} amplifiers of {size} px, "
                                   f"{dtype}, seed {seed}")
    write_spec(out, spec)
    log.info("wrote %d CCD FITS files (%d HDUs of %d px) to %s", n, n_hdus, size, out)
    return Path(out)
