"""cai: Constitutional AI / RLAIF training with TRL (Bai et al. 2022)."""

__version__ = "0.1.0"
