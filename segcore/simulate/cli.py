"""``gigaseg simulate {sem,ccd,shapes,lines} --out DIR --n N --size S --seed S``: write a synthetic
dataset folder (images/, masks/, dataset.yaml) that ``segcore.data.load_samples`` reads."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

DEFAULT_SIZE = {"shapes": 128, "sem": 256, "ccd": 256, "lines": 400}
HELP = {
    "shapes": "lines and ellipses on noise (3 classes, 8-bit PNG)",
    "sem": "SEM-like sandstone (pore/quartz/albite/clay, 16-bit TIFF, colour-coded RGB masks)",
    "ccd": "CCD-like multi-HDU FITS in ADU (background/glow/hot/cluster, per-HDU PNG masks)",
    "lines": "thin lines (3-5 px) and ellipses in RGB, SIZE x SIZE/2 px (seed 003; 3 classes, 8-bit PNG)",
}


def _run(args: argparse.Namespace) -> int:
    from segcore.simulate import ccd, lines, sem, shapes

    size = args.size or DEFAULT_SIZE[args.kind]
    if args.kind == "lines":
        lines.generate_lines(args.out, args.n, size, args.seed, style=args.style)
    elif args.kind == "shapes":
        shapes.generate_shapes(args.out, args.n, size, args.seed)
    elif args.kind == "sem" and args.label_scale is not None:
        sem.generate_sem_qemscan(args.out, args.n, size, args.seed, label_scale=args.label_scale)
    elif args.kind == "sem":
        sem.generate_sem(args.out, args.n, size, args.seed)
    else:
        ccd.generate_ccd(args.out, args.n, size, args.seed, n_hdus=args.hdus, dtype=args.dtype)
    log.info("dataset ready: %s", args.out)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``simulate`` and its generators to the ``gigaseg`` command."""
    parser = subparsers.add_parser("simulate", help="write a synthetic dataset (sem, ccd, shapes, lines)",
                                   description=__doc__.splitlines()[0])
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind in ("sem", "ccd", "shapes", "lines"):
        p = kinds.add_parser(kind, help=HELP[kind], description=HELP[kind])
        p.add_argument("--out", required=True, help="dataset folder to create")
        p.add_argument("--n", type=_positive, default=8, help="number of images (files) [8]")
        p.add_argument("--size", type=_positive, default=None,
                       help=f"image {'width (height: half)' if kind == 'lines' else 'side'} in px "
                            f"[{DEFAULT_SIZE[kind]}]")
        p.add_argument("--seed", type=int, default=0, help="random seed [0]")
        if kind == "sem":
            p.add_argument("--label-scale", type=float, default=None, metavar="K",
                           help="write tiled BigTIFF scans and QEMSCAN-like colour masks K x coarser "
                                "(dataset.yaml gets mask_scale: K) [same-size masks]")
        if kind == "lines":
            p.add_argument("--style", choices=("varied", "seed003", "seed003-hard"), default="varied",
                           help="varied: colour, blur and noise on every shape; seed003: seed 003's own "
                                "recipe (grey, flat shapes on truncated-Gaussian noise); seed003-hard: that "
                                "recipe with shaded, textured shapes and soft edges, as its real images [varied]")
        if kind == "ccd":
            p.add_argument("--hdus", type=_positive, default=2, help="amplifier HDUs per file [2]")
            p.add_argument("--dtype", choices=("uint16", "float32"), default="uint16",
                           help="uint16 is stored as int16 + BZERO=32768 [uint16]")
        p.set_defaults(func=_run)
