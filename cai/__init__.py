"""cai: Constitutional AI / RLAIF training with TRL (Bai et al. 2022)."""

import os

__version__ = "0.1.0"

# transformers swaps layers (Llama's rotary embedding and RMSNorm, attention, MoE, ...) for
# compiled kernels it downloads from the Hugging Face hub (kernels-community/*) and runs in
# this process whenever the `kernels` package is installed, unless USE_HUB_KERNELS says no.
# cai runs no remote code unasked, and offline that download fails mid-stage: every entry
# point imports this package first, so hub kernels are off, whatever the environment says,
# until a run config opts in with `hub_kernels: true` (cai.models.set_hub_kernels).
os.environ["USE_HUB_KERNELS"] = "NO"
