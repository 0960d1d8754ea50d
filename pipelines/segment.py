"""``gigaseg segment`` / ``python -m pipelines.segment``: segment whole archives with Ray Data.

    gigaseg segment --model models:/sem@champion --input '/archive/**/*.tif' /archive/ccd/*.fits --output OUT/

Runs on the Ray cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it) or at --address; without
one, on this machine in this process (no Ray start; ``--executor ray`` starts a local Ray instead).
Stop it any time (Ctrl-C prints how many work units are written); rerunning the same command
resumes: inputs the manifest lists as done are skipped and unfinished images redo only their
missing work units. One run at a time per output folder (OUT/.gigaseg/lock). An output name
that holds another file's labels (same name, other folder or file) is refused for that input:
pass --overwrite or use another --output.
Exit status: 0 all done, 1 some inputs failed (see OUT/manifest.jsonl), 2 bad arguments or a
locked/unusable output folder, 130 stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.runner import Interrupted, RunConfig, segment_archive
from segcore.cli import module_main

log = logging.getLogger("gigaseg.segment")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or MLflow URI, e.g. models:/sem@champion")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories ending .zarr, or globs ('**' recurses; quote them for ray job submit)")
    p.add_argument("--output", required=True, help="output directory (shared by all nodes on a cluster)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow server of a models:/ or runs:/ --model, passed to every actor "
                        "(default: MLFLOW_TRACKING_URI, else the SQLite store under GIGASEG_HOME)")
    g = p.add_argument_group("tiling and prediction (change the output)")
    g.add_argument("--tile", type=int, default=None,
                   help="write region edge = output chunk edge, a multiple of the model's size multiple "
                        "(default: the smallest tile within --max-overhead for the halo, capped by memory)")
    g.add_argument("--halo", type=int, default=None,
                   help="context pixels around each tile (default: the model card's measured extra.halo, "
                        "else 4 x the model's stride: 128 for a depth-5 U-Net); rounded up to the size multiple")
    g.add_argument("--max-overhead", type=float, default=None,
                   help="forward px per output px allowed in interior windows when choosing the tile "
                        "(default 1.35)")
    g.add_argument("--memory-gb", type=float, default=None,
                   help="memory for one model call's activations per worker, which sizes the chosen tile and "
                        "strips (default: half the node's RAM over the workers; a fast, memory-hungry choice)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="windows per model call (default 8; fewer when a chosen tile needs it to fit memory)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average predictions over flips (4x compute); default: the model card's choice "
                        "(extra.tta, set by a search when TTA gained on validation), else off")
    g.add_argument("--blend-tile", type=int, default=None,
                   help="predict each window as Gaussian-blended sub-tiles of this size (models with global context)")
    g.add_argument("--blend-overlap", type=float, default=0.5, help="sub-tile overlap fraction (default 0.5)")
    g.add_argument("--only-class", default=None, metavar="NAME", help="write a 0/1 mask of this class only")
    g.add_argument("--probabilities", action="store_true", help="also store float16 class probabilities")
    g.add_argument("--uncertainty", action="store_true", help="also store float16 normalised softmax entropy")
    g.add_argument("--labels-at", choices=["input", "model"], default="input",
                   help="for a model trained at data.scale > 1: write labels on the input's grid (nearest, "
                        "default) or on the model's grid (1 px per model px)")
    g.add_argument("--device", default="auto", help="auto (GPU if the actor has one), cpu or cuda")
    r = p.add_argument_group("execution (no effect on the output)")
    r.add_argument("--executor", choices=["auto", "local", "ray"], default="auto",
                   help="auto (default): Ray when --address, RAY_ADDRESS or more than one GPU gives it a "
                        "cluster, else local: in this process, no Ray start; ray: a new local Ray otherwise")
    r.add_argument("--workers", type=int, default=None,
                   help="model actors, or concurrent units in one process when local (default: one per GPU, "
                        "else one per CPU for windows under 1024 px and one with every CPU as a thread above)")
    r.add_argument("--worker-cpus", type=float, default=None, help="CPUs requested per actor (default 0.5; 0.25 with GPU)")
    r.add_argument("--threads", type=int, default=None, help="torch threads per actor")
    r.add_argument("--no-overlap", action="store_true", help="one call at a time per actor (no read/predict overlap)")
    r.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    r.add_argument("--overwrite", action="store_true", help="redo inputs the manifest lists as done")
    r.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments; 0 if every input is done, 1 if some failed."""
    cfg = RunConfig(executor=args.executor, workers=args.workers, worker_cpus=args.worker_cpus, threads=args.threads,
                    overlap=not args.no_overlap, address=args.address, overwrite=args.overwrite,
                    progress_bars=not args.no_progress)
    try:
        report = segment_archive(
            args.model, args.input, args.output, cfg, tile=args.tile, halo=args.halo, batch_size=args.batch_size,
            tta=args.tta, blend_tile=args.blend_tile, blend_overlap=args.blend_overlap, only_class=args.only_class,
            probabilities=args.probabilities, uncertainty=args.uncertainty, labels_at=args.labels_at, device=args.device,
            tracking_uri=args.tracking_uri, max_overhead=args.max_overhead, memory_gb=args.memory_gb)
    except Interrupted as stop:  # Ctrl-C: one line with the progress kept, no traceback
        log.error("%s", stop)
        return 130
    log.info("finished in %.1f s: %d done, %d failed, %d skipped (already done); manifest %s/manifest.jsonl",
             report.wall_s, len(report.done), len(report.failed), len(report.skipped), args.output)
    for error in report.failed.values():
        log.error("failed: %s", error)
    return 1 if report.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Entry point ``gigaseg.commands: segment``: add the parser and set ``func``."""
    p = subparsers.add_parser("segment", help="segment image archives with Ray Data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.segment``: the same arguments and behaviour as ``gigaseg segment``."""
    return module_main("python -m pipelines.segment", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
