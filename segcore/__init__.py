"""segcore: models, losses, metrics, data, tiling and the one training loop of gigaseg. No Ray here."""

__version__ = "0.1.0"
