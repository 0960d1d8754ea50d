"""segcore: models, losses, metrics, data, tiling and the one training loop of gigaseg. No Ray here."""

import os

__version__ = "0.1.0"

# Transparent huge pages for torch's large CPU buffers (read by torch at its first allocation, so
# set before torch is imported; a value the user set is kept, 0 turns it off). A CPU forward pass
# allocates and frees its activations call after call, each a fresh mapping the kernel faults in
# 4 KiB at a time: with 2 MiB pages a resnet18 U-Net took 15-30x fewer page faults and ran
# x1.1-1.3 faster per pixel on 4-10 MP calls (2-core Xeon, bench/segment_vs_monai.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
