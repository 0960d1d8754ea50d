"""pix2pix's adversarial term for the one training loop (``loss.adversarial`` in the config).

A conditional PatchGAN (:mod:`segcore.models.discriminator`) learns to tell real
(image, one-hot mask) pairs from (image, generator probabilities) pairs; the generator (the
segmentation model, unchanged) adds ``weight`` x "fool the discriminator" to its segmentation
loss, which plays the role of pix2pix's L1 term. Per batch, :mod:`segcore.train` calls
:meth:`AdversarialTerm.discriminator_step` (the discriminator's own Adam step on detached
predictions) and then adds :meth:`AdversarialTerm.generator_loss` to the generator's loss.

Ignored pixels (255) carry no label, so the real label map takes the generator's own
(detached) prediction there: both pairs agree on those pixels and the discriminator learns
nothing from them. Only the generator goes into model directories; the discriminator and its
optimiser live in training checkpoints (:meth:`state_dict`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from segcore.config import AdversarialConfig, TrainConfig
from segcore.device import train_autocast
from segcore.errors import ConfigError
from segcore.modelio.folder import logits_to_proba
from segcore.models.discriminator import PatchDiscriminator, output_size, receptive_field

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


class AdversarialTerm:
    """The discriminator, its optimiser and the adversarial losses of one training run."""

    def __init__(self, cfg: AdversarialConfig, image_channels: int, num_classes: int, device: torch.device,
                 world_size: int = 1, use_amp: bool = False) -> None:
        self.cfg, self.device, self.world_size, self.use_amp = cfg, device, world_size, use_amp
        self.num_classes = max(num_classes, 2)  # a 1-channel head is judged as its (1 - p, p) pair
        self.bare = PatchDiscriminator(image_channels + self.num_classes, cfg.depth, cfg.base_channels).to(device)
        self.discriminator: nn.Module = self.bare
        if world_size > 1:
            self.discriminator = nn.parallel.DistributedDataParallel(self.bare)
        self.optimizer = torch.optim.Adam(self.bare.parameters(), lr=cfg.lr, betas=cfg.betas)
        self._sums = torch.zeros(3, dtype=torch.float64)  # d loss, g adversarial loss, images

    # ------------------------------------------------------------------ steps

    def discriminator_step(self, images: torch.Tensor, masks: torch.Tensor, logits: torch.Tensor) -> float:
        """One optimiser step of the discriminator on real vs (detached) generated pairs; returns its loss."""
        fake = logits_to_proba(logits.detach().float())
        real = self.real_label_map(masks, fake)
        self.bare.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = images.shape[0]
        pairs = torch.cat([torch.cat([images, real], 1), torch.cat([images, fake], 1)])
        scores = self._judge(self.discriminator, pairs)  # one forward: one DDP reduction per step
        loss = 0.5 * (self._adversarial_loss(scores[:n], True) + self._adversarial_loss(scores[n:], False))
        loss.backward()
        self.optimizer.step()
        value = float(loss.detach())
        self._sums[0] += value * n
        self._sums[2] += n
        return value

    def generator_loss(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``weight`` x the loss of the generator's pairs judged real; gradients reach the generator only."""
        fake = logits_to_proba(logits.float())
        params = list(self.bare.parameters())
        for p in params:  # the graph records no discriminator weight: no wasted gradients, no DDP hooks
            p.requires_grad_(False)
        try:
            scores = self._judge(self.bare, torch.cat([images, fake], 1))
        finally:
            for p in params:
                p.requires_grad_(True)
        loss = self._adversarial_loss(scores, True)
        self._sums[1] += float(loss.detach()) * images.shape[0]
        return self.cfg.weight * loss

    def real_label_map(self, masks: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One-hot masks ``(N, K, H, W)``; ignored pixels take the generator's prediction ``fake``."""
        valid = masks != IGNORE_INDEX
        one_hot = F.one_hot(masks.masked_fill(~valid, 0), self.num_classes).permute(0, 3, 1, 2).to(fake.dtype)
        return torch.where(valid[:, None], one_hot, fake)

    def _judge(self, discriminator: nn.Module, pairs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            return discriminator(pairs).float()

    def _adversarial_loss(self, scores: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(scores) if real else torch.zeros_like(scores)
        if self.cfg.mode == "lsgan":
            return F.mse_loss(scores, target)
        return F.binary_cross_entropy_with_logits(scores, target)

    # ------------------------------------------------------------------ metrics and state

    def epoch_metrics(self) -> dict[str, float]:
        """Mean discriminator and (unweighted) generator adversarial losses of the epoch, over all ranks; resets."""
        sums = self._sums.clone()
        if self.world_size > 1:
            t = sums.to(self.device)
            dist.all_reduce(t)
            sums = t.cpu()
        self._sums.zero_()
        count = max(float(sums[2]), 1.0)
        return {"train_d_loss": float(sums[0]) / count, "train_g_adv_loss": float(sums[1]) / count}

    def state_dict(self) -> dict[str, Any]:
        """Discriminator weights and optimiser state (tensors and plain values: loads with ``weights_only``)."""
        return {"discriminator": self.bare.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bare.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


def build_adversarial(cfg: TrainConfig, num_classes: int, device: torch.device,
                      world_size: int = 1) -> AdversarialTerm | None:
    """The run's adversarial term, or None when ``loss.adversarial.weight`` is 0 (nothing built, no RNG used)."""
    adv = cfg.loss.adversarial
    if adv.weight == 0:
        return None
    if output_size(cfg.data.patch_size, adv.depth) < 1:
        raise ConfigError(
            f"loss.adversarial.depth={adv.depth} needs patches larger than data.patch_size={cfg.data.patch_size} "
            f"(the discriminator would output nothing); lower the depth or raise the patch size.")
    rf = receptive_field(adv.depth)
    log.info("adversarial term: %s x %s PatchGAN (depth %d, %dx%d receptive field, lr %g)",
             adv.weight, adv.mode, adv.depth, rf, rf, adv.lr)
    use_amp = train_autocast(device, cfg.amp)
    return AdversarialTerm(adv, cfg.model.in_channels, num_classes, device, world_size, use_amp)
