"""Ray Data tiled inference over whole archives: ``gigaseg segment`` / ``python -m pipelines.segment``.

Modules: ``readers`` (lazy pixel access by suffix), ``layout`` (output paths, manifest),
``plan`` (per-image plans and work units), ``predictor`` (model + TTA/blending),
``worker`` (the Ray Data actor), ``omezarr`` (label store + pyramid), ``finalize``
(pyramid, preview, summary, FITS products), ``runner`` (the Ray Data job), ``segment`` (CLI).
"""
