"""Model folders in and out: how a reference becomes a :class:`~segcore.modelio.folder.LoadedModel`.

Five layers, each importing only those above it in this list (``tests/test_layers.py`` keeps it so):

1. :mod:`.card`: the model card (``config.json``), pure data, no torch;
2. :mod:`.weights`: ``model.safetensors`` in and out, strict matching;
3. :mod:`.folder`: one model folder <-> :class:`~segcore.modelio.folder.LoadedModel`;
4. :mod:`.ensemble`: an ensemble folder, built on 3 (and greedy ensemble selection);
5. :mod:`.ref`: references (a path, ``runs:/``, ``models:/...``), the download cache and pinning;
   the only layer that knows MLflow, and the only one that chooses between 3 and 4
   (:func:`~segcore.modelio.ref.load_model`, :func:`~segcore.modelio.ref.load_model_dir`,
   :func:`~segcore.modelio.ref.read_card`).

Architectures (:mod:`segcore.models`) sit below layer 3; the MLflow pyfunc
(:mod:`segcore.mlflow_model`) above layer 5. Import names from the modules; this file imports nothing.
"""
