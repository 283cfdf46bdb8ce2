"""clpoison: availability poisoning of contrastive learning (He, Zha, Katabi, ICLR 2023, and beyond)."""

__version__ = "0.1.0"
