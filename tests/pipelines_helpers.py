"""Shared builders for the pipelines tests: a tiny real model directory, small real TIFF /
FITS files (and broken ones), and the whole-image reference prediction to compare against."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tifffile
import torch
from astropy.io import fits

from segcore.config import ModelConfig, NormalizeConfig, TrainConfig
from segcore.data.normalize import NormStats, apply_norm
from segcore.modelio.card import ModelCard
from segcore.modelio.folder import save_model_dir
from segcore.modelio.ref import load_model
from segcore.models import build_model
from segcore.tiling import flip_tta, pad_to_multiple, predict_whole

CLASSES = ["background", "glow", "hot", "cluster"]
COLORS = [(0, 0, 0), (255, 128, 0), (255, 0, 0), (0, 200, 255)]
REACH = 29  # receptive-field reach of Unet(resnet18, encoder_depth=2), measured by gradients
HALO = 32  # >= REACH and a multiple of the stride (4): tiled == whole-image labels
TILE = 64
STRIDE = 4


def make_model(path: Path, seed: int = 0, normalize: NormalizeConfig | None = None, extra: dict | None = None) -> Path:
    """A random-init Unet(resnet18, encoder depth 2) whose head is centred on typical inputs and
    scaled, so all classes occur and argmax ties are rare (a stand-in for a trained model)."""
    torch.manual_seed(seed)
    cfg = TrainConfig(
        model=ModelConfig(arch="Unet", encoder="resnet18", classes=len(CLASSES),
                          arch_kwargs={"encoder_depth": 2, "decoder_channels": [16, 8]}),
        normalize=normalize or NormalizeConfig(mode="percentile", low_percentile=1, high_percentile=99),
    )
    model = build_model(cfg.model).eval()
    head = model.segmentation_head[0]
    calib = torch.from_numpy(structured((128, 128), seed + 99, 255).astype(np.float32) / 255)[None, None]
    with torch.no_grad():
        head.weight.mul_(20)
        head.bias.zero_()
        logits = model(calib)
        head.bias.sub_(logits.mean(dim=(0, 2, 3)))
    card = ModelCard(train=cfg, class_names=CLASSES, class_colors=COLORS, extra=extra or {})
    return save_model_dir(path, model, card)


def structured(shape: tuple[int, int], seed: int, high: int) -> np.ndarray:
    """Smooth blobs plus noise, scaled to [0, high]: enough structure for varied labels."""
    rng = np.random.default_rng(seed)
    small = rng.random((shape[0] // 16 + 2, shape[1] // 16 + 2))
    big = np.kron(small, np.ones((16, 16)))[: shape[0], : shape[1]]
    img = 0.7 * big + 0.3 * rng.random(shape)
    return (img / img.max() * high).astype(np.uint16 if high > 255 else np.uint8)


def write_tiled_tiff8(path: Path, shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    img = structured(shape, seed, 255)
    tifffile.imwrite(path, img, tile=(32, 32), compression="zlib")
    return img


def write_striped_tiff16(path: Path, shape: tuple[int, int], seed: int = 2) -> np.ndarray:
    img = structured(shape, seed, 65535)
    tifffile.imwrite(path, img, rowsperstrip=8, compression="zlib")
    return img


def write_fits_bzero(path: Path, shape: tuple[int, int], n_hdus: int = 2, seed: int = 3) -> list[np.ndarray]:
    """Multi-extension FITS of uint16 amplifiers: astropy stores them as int16 + BZERO 32768."""
    data = [structured(shape, seed + k, 60000) for k in range(n_hdus)]
    hdus: list = [fits.PrimaryHDU()]
    for k, d in enumerate(data):
        hdu = fits.ImageHDU(d, name=f"AMP{k + 1}")
        hdu.header["PEDESTAL"] = (1000.0, "baseline level [ADU]")
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return data


def write_corrupt_tiff(path: Path) -> None:
    path.write_bytes(b"II*\x00" + b"\xff" * 200)


def write_truncated_fits(path: Path, shape: tuple[int, int]) -> None:
    write_fits_bzero(path, shape)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2 * 2880])


def reference_labels(model_dir: Path, image: np.ndarray, stats: NormStats, halo: int = HALO,
                     tta: bool = False) -> np.ndarray:
    """Whole-image labels: the image normalised with ``stats``, padded only to the stride, one call
    (what tiling with a halo >= the model's reach reproduces; ``halo`` is kept for callers)."""
    loaded = load_model(model_dir, device="cpu")
    predict = pad_to_multiple(flip_tta(loaded.predict_proba) if tta else loaded.predict_proba, STRIDE)
    x = apply_norm(image[None], stats)
    return predict_whole(x, predict).argmax(0).astype(np.uint8)


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (byte-identity checks)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not any(s in p.name for s in skip)}
