"""pix2pix's adversarial term in the one training loop: off by default and a no-op at weight 0,
trains both networks when on, resumes both, saves only the generator, and runs under DDP."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from segcore.adversarial import AdversarialTerm
from segcore.cli import main as gigaseg
from segcore.config import AdversarialConfig, ConfigError, TrainConfig, parse_config
from segcore.modelio.ref import load_model_dir
from segcore.models.discriminator import PatchDiscriminator, output_size, receptive_field
from segcore.train import STATE_FILE, build_run, load_checkpoint, train

TINY = {
    "model": {"arch": "Unet", "encoder": "resnet18", "arch_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
    "data": {"patch_size": 64, "patches_per_epoch": 16, "batch_size": 8, "val_tile": 64, "val_halo": 16},
    "epochs": 2,
    "augment": {"strength": 0.3},
    "seed": 3,
}
ADV = {"weight": 0.5, "base_channels": 16}


def _cfg(adversarial: dict | None = None, **extra) -> TrainConfig:
    data = {**TINY, **extra}
    if adversarial is not None:
        data["loss"] = {"terms": {"dice": 1.0, "focal": 0.5}, "adversarial": adversarial}
    return parse_config(data, TrainConfig)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes-adv")
    assert gigaseg(["simulate", "shapes", "--out", str(root / "train"), "--n", "4", "--size", "96", "--seed", "1"]) == 0
    return root / "train"


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the discriminator


def test_patchgan_default_is_pix2pix_70x70():
    """depth 3 = 3 stride-2 + 2 stride-1 4x4 convolutions: 70x70 receptive field, 30x30 logits on 256 px."""
    assert receptive_field(3) == 70 and receptive_field(1) == 16
    d = PatchDiscriminator(in_channels=1 + 3, depth=3, base_channels=64)
    out = d(torch.zeros(2, 4, 256, 256))
    assert out.shape == (2, 1, 30, 30) == (2, 1, output_size(256, 3), output_size(256, 3))
    strides = [m.stride[0] for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1, 1]


def test_ignored_pixels_take_the_generators_prediction_and_binary_heads_work():
    term = AdversarialTerm(AdversarialConfig(weight=1.0, mode="bce", base_channels=8), 1, 2, torch.device("cpu"))
    masks = torch.tensor([[[0, 1], [255, 1]]]).repeat(1, 16, 16)  # (1, 32, 32)
    logits = torch.randn(1, 1, 32, 32, requires_grad=True)  # a 1-channel binary head
    fake = torch.cat([1 - torch.sigmoid(logits), torch.sigmoid(logits)], 1).detach()
    real = term.real_label_map(masks, fake)
    ignored = (masks == 255)[:, None].expand_as(real)
    assert torch.equal(real[ignored], fake[ignored])
    assert set(real[~ignored].tolist()) == {0.0, 1.0} and torch.allclose(real.sum(1), torch.ones(1, 32, 32))
    images = torch.randn(1, 1, 32, 32)
    assert term.discriminator_step(images, masks, logits) > 0
    term.generator_loss(images, logits).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.requires_grad for p in term.bare.parameters())
    assert set(term.epoch_metrics()) == {"train_d_loss", "train_g_adv_loss"}


def test_too_deep_a_discriminator_for_the_patch_is_a_config_error(shapes_data):
    with pytest.raises(ConfigError, match="loss.adversarial.depth"):
        build_run(_cfg({**ADV, "depth": 5}), shapes_data)
    with pytest.raises(ConfigError):
        _cfg({"weight": 0.1, "mode": "wgan"})


# ----------------------------------------------------------------------------- training


def test_weight_zero_trains_bit_identically_to_no_adversarial_key(shapes_data, tmp_path):
    plain = train(_cfg(), shapes_data, tmp_path / "plain")
    zero = train(_cfg({"weight": 0.0}), shapes_data, tmp_path / "zero")
    drop = ("epoch_time_s", "train_minutes")  # wall clock, not training
    np.testing.assert_equal([{k: v for k, v in h.items() if k not in drop} for h in plain.history],
                            [{k: v for k, v in h.items() if k not in drop} for h in zero.history])  # exact; NaN == NaN
    assert "train_d_loss" not in zero.history[-1]
    assert _same(load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "zero" / "model.safetensors"))
    assert build_run(_cfg({"weight": 0.0}), shapes_data).adversarial is None


def test_weight_above_zero_trains_both_networks_and_resume_restores_both(shapes_data, tmp_path):
    cfg = _cfg(ADV)
    fresh = build_run(cfg, shapes_data)  # the initial weights of both networks (same seed)
    g0, d0 = _clone(fresh.bare_model.state_dict()), _clone(fresh.adversarial.bare.state_dict())
    full = train(cfg, shapes_data, tmp_path / "full", callbacks=[lambda r: r.save_checkpoint(tmp_path / f"ckpt{r.epoch}")])
    assert full.history[-1]["train_d_loss"] > 0 and full.history[-1]["train_g_adv_loss"] > 0

    saved = torch.load(tmp_path / "ckpt0" / STATE_FILE, weights_only=True)
    d_saved = saved["adversarial"]["discriminator"]
    g_saved = load_file(tmp_path / "ckpt0" / "model.safetensors")
    assert any(not torch.equal(d0[k], d_saved[k]) for k in d0), "the discriminator did not train"
    assert any(not torch.equal(g0[k], g_saved[k]) for k in g0 if k in g_saved), "the generator did not train"

    resumed = build_run(cfg, shapes_data)
    assert load_checkpoint(resumed, tmp_path / "ckpt0") == 1
    assert _same(resumed.adversarial.bare.state_dict(), d_saved)
    assert resumed.adversarial.optimizer.state_dict()["state"][0]["step"] == saved["adversarial"]["optimizer"]["state"][0]["step"]
    assert _same(resumed.bare_model.state_dict(), {**resumed.bare_model.state_dict(), **g_saved})

    epochs: list[int] = []
    again = train(cfg, shapes_data, tmp_path / "again", resume_from=tmp_path / "ckpt0", callbacks=[lambda r: epochs.append(r.epoch)])
    assert epochs == [1] and len(again.history) == 2 and "train_d_loss" in again.history[-1]


def test_model_directory_holds_only_the_generator(shapes_data, tmp_path):
    cfg = _cfg(ADV, epochs=1)
    train(cfg, shapes_data, tmp_path / "m", callbacks=[lambda r: r.save_checkpoint(tmp_path / "ckpt")])
    generator_keys = set(build_run(cfg, shapes_data).bare_model.state_dict())
    discriminator_keys = set(PatchDiscriminator(4, 3, 16).state_dict())
    for directory in (tmp_path / "m", tmp_path / "ckpt"):
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert keys <= generator_keys and not keys & discriminator_keys
    assert load_model_dir(tmp_path / "m", device="cpu").predict_proba(torch.zeros(1, 1, 64, 64).numpy()).shape == (1, 3, 64, 64)


# ----------------------------------------------------------------------------- DDP


def _adv_rank(rank: int, world: int, port: int, data: str, out: str) -> None:
    """One rank of ``train()`` with the adversarial term under a real gloo process group."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = train(_cfg(ADV, epochs=1), data, f"{out}/rank{rank}",
                   callbacks=[lambda r: r.save_checkpoint(Path(f"{out}/ckpt{rank}"))])
    Path(f"{out}/rank{rank}.json").write_text(json.dumps({k: result.metrics[k] for k in ("val_miou", "train_d_loss")}))
    dist.destroy_process_group()


def test_ddp_two_ranks_train_one_shared_discriminator(shapes_data, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_adv_rank, args=(2, port, str(shapes_data), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP train() with the adversarial term hung")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["train_d_loss"] > 0  # losses averaged over ranks
    d0, d1 = (torch.load(tmp_path / f"ckpt{r}" / STATE_FILE, weights_only=True)["adversarial"]["discriminator"]
              for r in (0, 1))
    assert _same(d0, d1)  # gradients all-reduced: both ranks hold the same discriminator


def test_adversarial_weight_is_a_search_dimension():
    from search.dimensions import parse_dimension
    from search.space import SearchSpace

    dim = parse_dimension("adversarial_weight", {"uniform": [0.0, 0.5]})
    assert dim.path == "loss.adversarial.weight"
    space = SearchSpace(base={"loss": {"terms": {"dice": 1.0}}}, dims=[dim])
    cfg = space.to_train_config({"adversarial_weight": 0.25})
    assert cfg.loss.adversarial.weight == 0.25 and cfg.loss.terms == {"dice": 1.0}
