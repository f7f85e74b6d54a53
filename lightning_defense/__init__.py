"""lightning_defense: defenses and certificates against clean-label data poisoning for PyTorch Lightning."""

__version__ = "0.1.0"
