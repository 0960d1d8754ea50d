"""How much halo makes tiling seams vanish? Tiled vs whole-image prediction as a function of halo.

    python bench/halo_seams.py                                  # random-init U-Nets, resnet18 and resnet34
    python bench/halo_seams.py --model models:/sem@champion     # a trained model (repeat --model for more)

On a synthetic SEM image (segcore.simulate.sem), each model predicts the whole image once
(reflect-padded by the largest halo, the reference) and then tile by tile for every halo in
--halos. Printed per model and halo: max and mean |p_tiled - p_whole| over all class
probabilities, the fraction of pixels whose label differs, and forward pixels per output
pixel. Random-init models get a centred, scaled head (so classes vary like a trained model's);
their receptive-field reach, measured with input gradients, is printed too. Pick the smallest
halo whose label difference is 0 (or negligible) and record it on the model card as
``extra["halo"]``: ``gigaseg segment`` then uses it by default.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from segcore.config import ModelConfig
from segcore.data.normalize import apply_norm, compute_norm_stats
from segcore.modelref import load_model
from segcore.models import build_model
from segcore.simulate.sem import render_sem
from segcore.tiling import forward_pixels_per_output, pad_to_multiple, predict_tiled, predict_whole

log = logging.getLogger("bench.halo_seams")
Predict = Callable[[np.ndarray], np.ndarray]


def random_unet(encoder: str, depth: int, image: np.ndarray, seed: int = 0) -> torch.nn.Module:
    """Random-init smp Unet with the head centred on this image's features and scaled x20."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="Unet", encoder=encoder, classes=4, arch_kwargs={"encoder_depth": depth}))
    model.eval()
    head = model.segmentation_head[0]
    with torch.no_grad():
        head.weight.mul_(20)
        head.bias.zero_()
        crop = torch.from_numpy(np.ascontiguousarray(image[None, :, :256, :256]))
        head.bias.sub_(model(crop).mean(dim=(0, 2, 3)))
    return model


def reach(model: torch.nn.Module, size: int = 1024) -> int:
    """Receptive-field reach (px) at the centre pixel, from input gradients (capped at size / 2)."""
    x = torch.randn(1, 1, size, size, requires_grad=True)
    model(x)[0, :, size // 2, size // 2].sum().backward()
    rows = np.nonzero(x.grad[0, 0].abs().sum(1).numpy() > 0)[0]
    return int(max(size // 2 - rows.min(), rows.max() - size // 2))


def torch_predictor(model: torch.nn.Module, stride: int) -> Predict:
    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        return torch.softmax(model(torch.from_numpy(np.ascontiguousarray(batch))), dim=1).numpy()

    return pad_to_multiple(predict, stride)


def seam_rows(name: str, predict: Predict, image: np.ndarray, tile: int, halos: list[int],
              batch: int) -> list[tuple]:
    whole = predict_whole(image, predict, max(halos))
    labels = whole.argmax(0)
    rows = []
    for halo in halos:
        t0 = time.perf_counter()
        tiled = predict_tiled(image, predict, tile=tile, halo=halo, batch_size=batch)
        diff = np.abs(tiled - whole)
        rows.append((name, halo, float(diff.max()), float(diff.mean()), float((tiled.argmax(0) != labels).mean()),
                     forward_pixels_per_output(tile, halo), time.perf_counter() - t0))
    return rows


def print_table(rows: list[tuple]) -> None:
    print(f"{'model':<34} {'halo':>5} {'max|dp|':>10} {'mean|dp|':>10} {'labels differ':>14} "
          f"{'fwd px/out px':>14} {'s':>6}")
    for name, halo, mx, mean, frac, fwd, sec in rows:
        print(f"{name:<34} {halo:>5} {mx:>10.2e} {mean:>10.2e} {100 * frac:>13.4f}% {fwd:>14.2f} {sec:>6.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], help="model directory or MLflow URI (repeatable)")
    p.add_argument("--encoders", default="resnet18,resnet34", help="random-init Unet encoders if no --model")
    p.add_argument("--depth", type=int, default=5, help="encoder depth of the random-init Unets")
    p.add_argument("--size", type=int, default=512, help="test image edge (px)")
    p.add_argument("--tile", type=int, default=256, help="write region edge (px)")
    p.add_argument("--halos", default="0,16,32,64,96,128")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    halos = [int(h) for h in args.halos.split(",")]
    raw, _ = render_sem((args.size, args.size), seed=args.seed)
    rows = []
    for ref in args.model:
        loaded = load_model(ref, device="cpu")
        image = apply_norm(raw[None], compute_norm_stats(raw, loaded.card.train.normalize))
        stride = 2 ** int(loaded.card.train.model.arch_kwargs.get("encoder_depth", 5))
        rows += seam_rows(ref, pad_to_multiple(loaded.predict_proba, stride), image, args.tile, halos, args.batch_size)
    if not args.model:
        image = (raw[None].astype(np.float32) / 65535).astype(np.float32)
        for enc in args.encoders.split(","):
            model = random_unet(enc, args.depth, image, args.seed)
            name = f"Unet-{enc}-d{args.depth} (random, reach {reach(model)})"
            log.info("%s", name)
            rows += seam_rows(name, torch_predictor(model, 2**args.depth), image, args.tile, halos, args.batch_size)
    print_table(rows)


if __name__ == "__main__":
    main()
