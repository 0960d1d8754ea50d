"""Freeze strategies on a real (tiny) model with real optimizer steps: frozen means bit-identical."""

from __future__ import annotations

import pytest
import torch

from segcore.config import FreezeConfig, ModelConfig
from segcore.models import FreezeController, build_model

SIZE = 32


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="Unet",
        encoder="resnet18",
        in_channels=1,
        classes=2,
        arch_kwargs={"encoder_depth": 3, "decoder_channels": [32, 16, 8]},
    )
    return build_model(cfg)


def encoder_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every encoder tensor: parameters AND buffers (BN running mean/var, num_batches_tracked)."""
    return {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}


def changed(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> list[str]:
    now = model.encoder.state_dict()
    return [k for k, v in snap.items() if not torch.equal(v, now[k])]


def make_optimizer(ctrl: FreezeController, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(ctrl.param_groups(), lr=ctrl.base_lr, momentum=0.9, weight_decay=0.1)
    return torch.optim.AdamW(ctrl.param_groups(), lr=ctrl.base_lr, weight_decay=0.1)


def run_epoch(model, ctrl: FreezeController, opt, epoch: int, steps: int = 3) -> None:
    """A plain training loop, the way segcore.train uses the controller."""
    gen = torch.Generator().manual_seed(epoch)
    ctrl.on_epoch_start(epoch)
    ctrl.train_mode()
    for _ in range(steps):
        x = torch.randn(4, 1, SIZE, SIZE, generator=gen)
        y = torch.randint(0, 2, (4, SIZE, SIZE), generator=gen)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("optim", ["adamw", "sgd"])
def test_frozen_encoder_is_bit_identical_while_decoder_trains(optim: str) -> None:
    model = tiny_model()
    snap = encoder_snapshot(model)
    dec_before = {k: v.detach().clone() for k, v in model.decoder.state_dict().items()}
    ctrl = FreezeController(model, FreezeConfig(strategy="frozen-encoder"), base_lr=1e-2)
    opt = make_optimizer(ctrl, optim)
    assert [g["name"] for g in opt.param_groups] == ["decoder"]
    for epoch in range(2):
        run_epoch(model, ctrl, opt, epoch)
    assert changed(model, snap) == []  # params and BN running stats untouched
    assert all(not p.requires_grad for p in model.encoder.parameters())
    dec_now = model.decoder.state_dict()
    dec_changed = [k for k, v in dec_before.items() if not torch.equal(v, dec_now[k])]
    assert any(k.endswith("weight") for k in dec_changed)
    assert any(k.endswith("running_mean") for k in dec_changed)  # decoder BN still learns stats


def test_staged_freezes_before_k_then_trains_with_lower_lr() -> None:
    model = tiny_model()
    snap = encoder_snapshot(model)
    cfg = FreezeConfig(strategy="staged", unfreeze_epoch=2, encoder_lr_scale=0.1)
    ctrl = FreezeController(model, cfg, base_lr=1e-2)
    opt = make_optimizer(ctrl, "adamw")
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"encoder": 1e-3, "decoder": 1e-2})
    for epoch in range(2):
        run_epoch(model, ctrl, opt, epoch)
        assert changed(model, snap) == [], f"encoder changed in epoch {epoch} < K"
    run_epoch(model, ctrl, opt, 2)
    moved = changed(model, snap)
    assert any(k.endswith("running_mean") for k in moved)
    assert any(k.endswith("conv1.weight") for k in moved)
    assert all(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("strategy", ["full", "random-init"])
def test_full_and_random_init_train_the_encoder_from_epoch_0(strategy: str) -> None:
    model = tiny_model()
    snap = encoder_snapshot(model)
    ctrl = FreezeController(model, FreezeConfig(strategy=strategy), base_lr=1e-2)
    opt = make_optimizer(ctrl, "adamw")
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"encoder": 1e-2, "decoder": 1e-2}
    run_epoch(model, ctrl, opt, 0, steps=1)
    assert len(changed(model, snap)) > 0


def test_train_mode_keeps_frozen_encoder_norms_in_eval() -> None:
    model = tiny_model()
    ctrl = FreezeController(model, FreezeConfig(strategy="staged", unfreeze_epoch=1), base_lr=1e-3)
    enc_bn = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    dec_bn = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ctrl.on_epoch_start(0)
    ctrl.train_mode()
    assert enc_bn and not any(m.training for m in enc_bn)
    assert dec_bn and all(m.training for m in dec_bn)
    ctrl.on_epoch_start(1)
    ctrl.train_mode()
    assert all(m.training for m in enc_bn)


def test_param_groups_cover_every_parameter_once() -> None:
    model = tiny_model()
    groups = FreezeController(model, FreezeConfig(strategy="full"), base_lr=1e-3).param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_controller_refuses_model_without_encoder() -> None:
    with pytest.raises(ValueError, match="no `.encoder`"):
        FreezeController(torch.nn.Linear(2, 2), FreezeConfig(), base_lr=1e-3)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One DDP rank (gloo, CPU): staged K=1, each rank sees different data."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model()
    ctrl = FreezeController(model, FreezeConfig(strategy="staged", unfreeze_epoch=1), base_lr=1e-2)
    opt = make_optimizer(ctrl, "adamw")
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    snap = encoder_snapshot(model)
    gen = torch.Generator().manual_seed(rank)
    for epoch in range(2):
        ctrl.on_epoch_start(epoch)
        ctrl.train_mode()
        for _ in range(2):
            x, y = torch.randn(2, 1, SIZE, SIZE, generator=gen), torch.randint(0, 2, (2, SIZE, SIZE), generator=gen)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        if epoch == 0:
            frozen_ok = changed(model, snap) == []
    torch.save({"frozen_ok": frozen_ok, "conv1": model.encoder.conv1.weight.detach().clone(),
                "moved": "conv1.weight" in changed(model, snap)}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_staged_under_ddp_keeps_ranks_in_sync_after_unfreezing(tmp_path) -> None:
    """DDP registers trainable params when it is built; the controller must not freeze before that."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["frozen_ok"] and r1["frozen_ok"]
    assert r0["moved"] and torch.equal(r0["conv1"], r1["conv1"])
