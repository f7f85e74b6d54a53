"""``python -m lightning_defense.cli``: the same as ``lightning-defense``."""

from lightning_defense.cli import main

main()
