"""Every architecture builds and runs; invalid combinations are refused; weights travel by file.

One parametrised tester (like smp's tests/models/base.py) covers every registered arch with two
tiny encoders at 64 px (or the smallest size the arch accepts). No pretrained weights are
downloaded: models are random-init or load files the tests wrote themselves.
"""

from __future__ import annotations

import socket

import pytest
import torch

from segcore.config import FreezeConfig, ModelConfig, TrainConfig
from segcore.errors import ModelError
from segcore.modelio.card import ModelCard
from segcore.modelio.folder import save_model_dir
from segcore.modelio.ref import load_model_dir
from segcore.models import (
    EncoderWeightsError,
    InvalidCombinationError,
    build_model,
    check_combination,
    list_architectures,
    list_encoders,
    list_valid_combinations,
    load_encoder_weights,
    probe_combination,
    save_encoder_weights,
)
from segcore.models.fold import conv_bn_pairs, fold_batchnorm, is_folded
from segcore.models.validity import valid_sizes
from segcore.registry import UnknownNameError

torch.set_num_threads(min(2, torch.get_num_threads()))

# Two small encoders per arch: resnet18 + a mobile-class one; mix-transformer for Segformer,
# timm ViTs (built offline, random init) for DPT.
DEFAULT_ENCODERS = ("resnet18", "mobilenet_v2")
ENCODERS = {"Segformer": ("mit_b0", "mobilenet_v2"), "DPT": ("tu-test_vit", "tu-vit_tiny_patch16_224")}
CASES = [(a, e) for a in list_architectures() for e in ENCODERS.get(a, DEFAULT_ENCODERS)]


def smallest_size(arch: str, encoder: str, want: int = 64) -> int:
    try:
        check_combination(arch, encoder, image_size=want)
        return want
    except InvalidCombinationError:
        return valid_sizes(arch, encoder)[0]


def test_every_smp_architecture_and_resunet_is_registered() -> None:
    expected = {"Unet", "UnetPlusPlus", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
                "MAnet", "PAN", "UPerNet", "Segformer", "DPT", "ResUNet"}
    assert set(list_architectures()) == expected
    assert {"resnet18", "mit_b0", "mobilenet_v2"} <= set(list_encoders())


@pytest.mark.parametrize(("arch", "encoder"), CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_build_and_forward(arch: str, encoder: str) -> None:
    size = smallest_size(arch, encoder)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=1, classes=3))
    assert isinstance(model.encoder, torch.nn.Module)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 3, size, size)


@pytest.mark.parametrize(("arch", "encoder"), CASES, ids=[f"{a}-{e}" for a, e in CASES])
def test_batchnorm_folding_keeps_the_output(arch: str, encoder: str) -> None:
    """Folded for inference, every architecture gives the same logits (BN statistics made non-trivial
    first, so a wrong fold shows), and its BN layers that follow a convolution are gone."""
    size = smallest_size(arch, encoder)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=1, classes=3))
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                              (m.bias, -0.2, 0.2)):
                t.data.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    x = torch.randn(2, 1, size, size, generator=gen)
    folded = fold_batchnorm(model, x[:1])
    with torch.no_grad():
        want, got = model(x), folded(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    if conv_bn_pairs(model, x[:1]):
        assert is_folded(folded) and left < bns


def test_a_folded_model_loads_by_default_and_is_not_saved(tmp_path) -> None:
    """Inference loads fold BatchNorm (same outputs); saving a folded model is refused, since its
    weights no longer match its config; fold_bn=False loads the model as trained, to edit and save."""
    cfg = ModelConfig(arch="Unet", encoder="resnet18", in_channels=1, classes=3)
    card = ModelCard(train=TrainConfig(model=cfg), class_names=["pore", "grain", "clay"])
    save_model_dir(tmp_path / "m", build_model(cfg).eval(), card)
    folded, plain = load_model_dir(tmp_path / "m", device="cpu"), load_model_dir(tmp_path / "m", device="cpu", fold_bn=False)
    assert is_folded(folded.model) and not is_folded(plain.model)
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(folded.predict_tensor(x), plain.predict_tensor(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ModelError, match="BatchNorm folded.*fold_bn=False"):
        save_model_dir(tmp_path / "again", folded.model, folded.card)
    save_model_dir(tmp_path / "again", plain.model, plain.card)


def test_importing_segcore_turns_on_huge_pages_unless_the_user_chose(tmp_path) -> None:
    """THP for torch's big CPU buffers is a default, set before torch reads it; a user's value stays."""
    import os
    import subprocess
    import sys

    code = "import segcore, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "1"
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "0"


def test_resunet_full_res_skip_reaches_the_last_block_and_survives_save_and_fold(tmp_path) -> None:
    """``arch_kwargs.full_res_channels`` gives ResUNet's last decoder block a skip from a block on
    the input itself: it trains (its weights get gradients), keeps odd sizes, and a saved model
    directory loads (BN folded) to the same outputs. Without the key there is no such block."""
    cfg = ModelConfig(arch="ResUNet", encoder="resnet18", in_channels=1, classes=3,
                      arch_kwargs={"full_res_channels": 8})
    model = build_model(cfg)
    assert build_model(cfg.model_copy(update={"arch_kwargs": {}})).decoder.full_res is None
    out = model(torch.randn(2, 1, 64, 96))
    assert out.shape == (2, 3, 64, 96)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.full_res.parameters())
    save_model_dir(tmp_path / "m", model.eval(), ModelCard(train=TrainConfig(model=cfg), class_names=["a", "b", "c"]))
    loaded = load_model_dir(tmp_path / "m", device="cpu")
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(loaded.predict_tensor(x), torch.softmax(want, 1), rtol=1e-4, atol=1e-5)


def test_pan_smallest_size_is_128() -> None:
    assert smallest_size("PAN", "resnet18") == 128
    with pytest.raises(InvalidCombinationError):  # the rule is real: smp itself fails at 112 px
        probe_combination("PAN", "resnet18", image_size=112)


@pytest.mark.parametrize(("arch", "encoder"), [("ResUNet", "resnet18"), ("FPN", "mit_b0")])
@pytest.mark.parametrize(("in_channels", "classes"), [(1, 1), (1, 4), (3, 1), (3, 4)])
def test_channels_and_classes(arch: str, encoder: str, in_channels: int, classes: int) -> None:
    shape = probe_combination(arch, encoder, in_channels=in_channels, image_size=64, classes=classes)
    assert shape == (2, classes, 64, 64)


INVALID = [
    ("UnetPlusPlus", "mit_b0", 64, "mix-transformer"),
    ("Linknet", "mit_b0", 64, "mix-transformer"),
    ("DPT", "resnet18", 64, "tu-"),
    ("DeepLabV3", "vgg11", 64, "cannot be dilated"),
    ("Unet", "tu-vit_tiny_patch16_224", 64, "ViT"),
    ("PAN", "resnet18", 64, "at least 128"),
    ("FPN", "resnet18", 48, "multiple of 32"),
    ("DPT", "tu-vit_tiny_patch16_224", 48, "multiple of 32"),
]


@pytest.mark.parametrize(("arch", "encoder", "size", "why"), INVALID, ids=[f"{a}-{e}-{s}" for a, e, s, _ in INVALID])
def test_invalid_combination_says_why_and_what_works(arch: str, encoder: str, size: int, why: str) -> None:
    with pytest.raises(InvalidCombinationError) as info:
        check_combination(arch, encoder, image_size=size)
    msg = str(info.value)
    assert why in msg
    assert ("Encoders that work with" in msg and "Architectures that work with" in msg) or "Valid sizes:" in msg


@pytest.mark.parametrize(("arch", "encoder", "size"), [("UnetPlusPlus", "mit_b0", 64), ("DPT", "resnet18", 64),
                                                      ("FPN", "resnet18", 48)])
def test_refused_combinations_really_fail_in_smp(arch: str, encoder: str, size: int) -> None:
    with pytest.raises(InvalidCombinationError, match="failed to run"):
        probe_combination(arch, encoder, image_size=size)


def test_build_model_refuses_invalid_pair_before_training() -> None:
    with pytest.raises(InvalidCombinationError, match="Encoders that work with Linknet"):
        build_model(ModelConfig(arch="Linknet", encoder="mit_b0"))


@pytest.mark.parametrize(("arch", "kwargs", "why", "fix"), [
    ("FPN", {"encoder_depth": 3}, "needs upsampling=1", {"upsampling": 1}),
    ("FPN", {"encoder_depth": 4}, "needs upsampling=2", {"upsampling": 2}),
    ("PSPNet", {"encoder_depth": 4, "upsampling": 8}, "needs upsampling=16", {"upsampling": 16}),
    ("Unet", {"encoder_depth": 3}, "needs decoder_channels with 3 entries", {"decoder_channels": [32, 16, 8]}),
    ("MAnet", {"encoder_depth": 4}, "needs decoder_channels with 4 entries", {"decoder_channels": [64, 32, 16, 8]}),
])
def test_arch_kwargs_that_break_the_output_are_refused_and_the_fix_works(arch: str, kwargs: dict, why: str,
                                                                         fix: dict) -> None:
    """smp builds FPN/PSPNet at a non-default depth, but predicts at the wrong scale; the rule says so."""
    with pytest.raises(InvalidCombinationError, match=why):
        check_combination(arch, "resnet18", image_size=64, arch_kwargs=kwargs)
    fixed = {**kwargs, **fix}
    check_combination(arch, "resnet18", image_size=64, arch_kwargs=fixed)
    model = build_model(ModelConfig(arch=arch, encoder="resnet18", classes=3, arch_kwargs=fixed)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_unknown_arch_and_encoder_suggest_names() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'Unet'"):
        build_model(ModelConfig(arch="Unte"))
    with pytest.raises(InvalidCombinationError, match="Did you mean 'resnet18'"):
        check_combination("Unet", "resnet81")


def test_list_valid_combinations_only_valid_pairs() -> None:
    at64 = list_valid_combinations(encoders=["resnet18", "mit_b0", "vgg11", "tu-test_vit"], image_size=64)
    assert ("Segformer", "mit_b0") in at64 and ("DPT", "tu-test_vit") in at64 and ("ResUNet", "vgg11") in at64
    for bad in [("UnetPlusPlus", "mit_b0"), ("Linknet", "mit_b0"), ("DPT", "resnet18"), ("DeepLabV3", "vgg11"),
                ("PAN", "resnet18"), ("Unet", "tu-test_vit")]:
        assert bad not in at64
    assert ("PAN", "resnet18") in list_valid_combinations(archs=["PAN"], encoders=["resnet18"], image_size=128)
    everything = list_valid_combinations()
    assert {a for a, _ in everything} == set(list_architectures()) - {"PAN"}  # PAN needs >= 128 px


# --- encoder weights -------------------------------------------------------------------------

def encoder_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_encoder_weights_move_between_models_by_file(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    src = build_model(ModelConfig(arch="Unet", encoder="resnet18", in_channels=1))
    path = save_encoder_weights(src, tmp_path / f"enc{suffix}")
    cfg = ModelConfig(arch="FPN", encoder="resnet18", in_channels=1, encoder_weights=str(path))
    fresh = build_model(cfg)
    assert not encoder_equal(src, fresh)
    loaded = build_model(cfg, load_weights=True)
    assert encoder_equal(src, loaded)
    ignored = build_model(cfg, load_weights=True, freeze=FreezeConfig(strategy="random-init"))
    assert not encoder_equal(src, ignored)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_whole_model_state_dict_supplies_encoder(tmp_path, suffix: str) -> None:
    src = build_model(ModelConfig(arch="ResUNet", encoder="mobilenet_v2"))
    path = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        card = ModelCard(train=TrainConfig(model=ModelConfig(arch="ResUNet", encoder="mobilenet_v2")),
                         class_names=["a", "b"])
        path = save_model_dir(tmp_path / "modeldir", src, card) / "model.safetensors"
    dst = build_model(ModelConfig(arch="DeepLabV3Plus", encoder="mobilenet_v2"))
    load_encoder_weights(dst, str(path))
    assert encoder_equal(src, dst)


def test_mismatched_weights_name_file_and_tensors(tmp_path) -> None:
    path = save_encoder_weights(build_model(ModelConfig(encoder="resnet18", in_channels=1)), tmp_path / "r18.pth")
    with pytest.raises(EncoderWeightsError, match=r"r18\.pth.*shape mismatches.*conv1\.weight"):
        load_encoder_weights(build_model(ModelConfig(encoder="resnet18", in_channels=3)), path)
    with pytest.raises(EncoderWeightsError, match=r"r18\.pth.*missing from the file"):
        load_encoder_weights(build_model(ModelConfig(encoder="mobilenet_v2", in_channels=1)), path)
    with pytest.raises(EncoderWeightsError, match="no such file"):
        build_model(ModelConfig(encoder_weights=str(tmp_path / "nope.pth")), load_weights=True)


@pytest.mark.parametrize("encoder", ["resnet18", "tu-resnet18"])
def test_imagenet_offline_gives_clear_error_without_network(tmp_path, monkeypatch, encoder: str) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cfg = ModelConfig(encoder=encoder, encoder_weights="imagenet")
    with pytest.raises(EncoderWeightsError, match="HF_HUB_OFFLINE") as info:
        build_model(cfg, load_weights=True)
    assert "save_encoder_weights" in str(info.value) and ".safetensors" in str(info.value)
    model = build_model(cfg)  # random init; loading afterwards takes the same path
    with pytest.raises(EncoderWeightsError, match="HF_HUB_OFFLINE"):
        load_encoder_weights(model, "imagenet")


def test_init_weights_start_the_whole_model_from_a_model_dir(tmp_path) -> None:
    """Warm start / fine-tuning: every tensor comes from the given model; another shape is refused."""
    cfg = ModelConfig(arch="Unet", encoder="resnet18", in_channels=1, classes=3)
    src = build_model(cfg)
    save_model_dir(tmp_path / "m", src, ModelCard(train=TrainConfig(model=cfg), class_names=["a", "b", "c"]))
    warm = build_model(cfg.model_copy(update={"init_weights": str(tmp_path / "m")}), load_weights=True)
    a, b = src.state_dict(), warm.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(build_model(cfg).decoder.state_dict()["blocks.0.conv1.0.weight"],
                           a["decoder.blocks.0.conv1.0.weight"])
    with pytest.raises(EncoderWeightsError, match=r"model\.safetensors.*does not match.*segmentation_head"):
        build_model(cfg.model_copy(update={"classes": 2, "init_weights": str(tmp_path / "m")}), load_weights=True)
    with pytest.raises(EncoderWeightsError, match="init_weights.*no such file"):
        build_model(cfg.model_copy(update={"init_weights": str(tmp_path / "nope")}), load_weights=True)


# --- model directory round trip --------------------------------------------------------------

@pytest.mark.parametrize(("arch", "encoder"), [("ResUNet", "resnet18"), ("DPT", "tu-test_vit"), ("Segformer", "mit_b0")])
def test_modeldir_round_trip_gives_identical_outputs(tmp_path, arch: str, encoder: str) -> None:
    cfg = ModelConfig(arch=arch, encoder=encoder, in_channels=1, classes=3)
    model = build_model(cfg).eval()
    card = ModelCard(train=TrainConfig(model=cfg), class_names=["pore", "grain", "clay"])
    save_model_dir(tmp_path / "m", model, card)
    loaded = load_model_dir(tmp_path / "m", device="cpu", fold_bn=False)
    x = torch.randn(2, 1, 64, 64)
    model = model.to(memory_format=torch.channels_last)  # loaded as trained: channels-last (card default)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.card.train.model == cfg
