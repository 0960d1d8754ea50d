"""Training step time in fp32 against bf16 autocast on this CPU, per architecture and thread count.

    python bench/train_amp.py                       # Unet/FPN x resnet18/34, 1 and 2 threads
    python bench/train_amp.py --archs Unet:resnet18 --threads 2 --patch 256 --batch 8

``amp: true`` (the default) trains under bf16 autocast on a GPU and on a CPU that runs bf16 in
hardware (Intel AMX or AVX512-BF16; :func:`segcore.device.train_autocast`). This script times the
step that ``segcore.train`` runs (channels-last, AdamW, the loss in fp32) both ways, side by side in
one process, and prints the fastest of ``--steps`` steps after warm-up. The fp32 column is the
baseline; ``speed-up`` is fp32 / bf16. On a CPU without native bf16, training stays fp32 and the
bf16 column shows what emulation would cost.
"""

from __future__ import annotations

import argparse
import time

import torch


def step_seconds(arch: str, encoder: str, bf16: bool, patch: int, batch: int, steps: int) -> float:
    """Fastest of ``steps`` training steps of ``arch``/``encoder`` on random data, after 2 warm-up steps."""
    from segcore.config import ModelConfig
    from segcore.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=encoder, in_channels=3, classes=4))
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, patch, patch).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch, patch, patch))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from segcore.device import cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["Unet:resnet18", "Unet:resnet34", "FPN:resnet18"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--patch", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(f"CPU native bf16 (AMX / AVX512-BF16): {cpu_has_native_bf16()}; batch {args.batch} x {args.patch}^2")
    print(f"{'model':<18} {'threads':>7} {'fp32 s/step':>12} {'bf16 s/step':>12} {'speed-up':>9}")
    for spec in args.archs:
        arch, encoder = spec.split(":")
        for threads in args.threads:
            torch.set_num_threads(threads)
            fp32 = step_seconds(arch, encoder, False, args.patch, args.batch, args.steps)
            bf16 = step_seconds(arch, encoder, True, args.patch, args.batch, args.steps)
            print(f"{spec:<18} {threads:>7} {fp32:>12.3f} {bf16:>12.3f} {fp32 / bf16:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
