"""Encoder freeze strategies: which encoder tensors train, when, and at what learning rate.

* ``full``: everything trains at the base LR.
* ``frozen-encoder``: the encoder never changes, its parameters are left out of the
  optimizer and its BatchNorm running statistics stay fixed (norm layers in eval mode).
* ``random-init``: like ``full``; the model was built without pretrained weights
  (``build_model(..., freeze=cfg)`` skips ``encoder_weights``).
* ``staged``: frozen as above for epochs ``< unfreeze_epoch`` (K), then trained with its own
  LR ``base_lr * encoder_lr_scale`` (the optimizer holds the encoder group from the start).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from segcore.config import FreezeConfig

log = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP keeps the real model in .module


class FreezeController:
    """Applies a :class:`~segcore.config.FreezeConfig` to a model built by ``build_model``.

    Use it like this in a training loop::

        ctrl = FreezeController(model, cfg.freeze, base_lr=cfg.optim.lr)
        opt = torch.optim.AdamW(ctrl.param_groups(), lr=cfg.optim.lr)
        for epoch in range(epochs):
            ctrl.on_epoch_start(epoch)
            ctrl.train_mode()                      # instead of model.train()
            for x, y in loader:
                opt.zero_grad(set_to_none=True)    # required, see below
                loss_fn(model(x), y).backward()
                opt.step()

    ``zero_grad(set_to_none=True)`` matters: optimizers skip only parameters whose ``.grad``
    is ``None``. A frozen parameter holding a zero gradient tensor would still move through
    weight decay (AdamW) or momentum (SGD), so frozen encoder weights would drift.
    """

    def __init__(self, model: nn.Module, cfg: FreezeConfig, base_lr: float) -> None:
        self.model = model
        self.cfg = cfg
        self.base_lr = float(base_lr)
        self.encoder: nn.Module = getattr(_unwrap(model), "encoder", None)  # type: ignore[assignment]
        if not isinstance(self.encoder, nn.Module):
            raise ValueError(
                f"{type(_unwrap(model)).__name__} has no `.encoder`; FreezeController needs a model "
                "built by segcore.models.build_model."
            )
        # Nothing is frozen until on_epoch_start(): a DistributedDataParallel wrapper built after
        # this controller must see the encoder as trainable, or it would never all-reduce the
        # encoder's gradients once ``staged`` unfreezes it (DDP registers params at construction;
        # train with find_unused_parameters=True while anything is frozen).
        self.encoder_frozen = False

    def encoder_trainable_at(self, epoch: int) -> bool:
        """Whether the strategy trains the encoder in ``epoch`` (0-based)."""
        if self.cfg.strategy == "frozen-encoder":
            return False
        if self.cfg.strategy == "staged":
            return epoch >= self.cfg.unfreeze_epoch
        return True  # full, random-init

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups ``[{"name": "encoder", ...}, {"name": "decoder", ...}]``.

        ``frozen-encoder`` has no encoder group at all; ``staged`` gets its encoder group at
        ``base_lr * encoder_lr_scale`` (still frozen until epoch K); ``full``/``random-init``
        train the encoder at ``base_lr``. Call once, when creating the optimizer.
        """
        enc_ids = {id(p) for p in self.encoder.parameters()}
        decoder = [p for p in _unwrap(self.model).parameters() if id(p) not in enc_ids]
        groups: list[dict[str, Any]] = []
        if self.cfg.strategy != "frozen-encoder":
            scale = self.cfg.encoder_lr_scale if self.cfg.strategy == "staged" else 1.0
            groups.append({"name": "encoder", "params": list(self.encoder.parameters()), "lr": self.base_lr * scale})
        groups.append({"name": "decoder", "params": decoder, "lr": self.base_lr})
        return groups

    def on_epoch_start(self, epoch: int) -> None:
        """Set ``requires_grad`` of every encoder parameter for ``epoch`` per the strategy."""
        trainable = self.encoder_trainable_at(epoch)
        for p in self.encoder.parameters():
            p.requires_grad_(trainable)
        if self.encoder_frozen == trainable or epoch == 0:
            log.info("epoch %d: encoder %s (%s)", epoch, "trainable" if trainable else "frozen", self.cfg.strategy)
        self.encoder_frozen = not trainable
        if self.encoder_frozen:
            self._freeze_norms()

    def train_mode(self) -> None:
        """``model.train()``, but encoder norm layers stay in eval mode while the encoder is frozen."""
        self.model.train()
        if self.encoder_frozen:
            self._freeze_norms()

    def _freeze_norms(self) -> None:
        for m in self.encoder.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase):  # BatchNorm/InstanceNorm with stats
                m.eval()
