"""The README's worked example of a purifying defense runs, and is the package's own class."""

import re
from pathlib import Path

import torch

from lightning_defense.datamodules import DigitsDataModule, GaussianNoiseDataModule

README = Path(__file__).resolve().parents[1] / "README.md"


def worked_example() -> str:
    text = README.read_text()
    section = text[text.index("### Adding a purifying defense: one file"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_a_working_defense_equal_to_the_shipped_one():
    namespace: dict = {}
    exec(compile(worked_example(), "README.md", "exec"), namespace)
    example = namespace["GaussianNoiseDataModule"](DigitsDataModule(image_size=8), sigma=0.25, seed=3)
    shipped = GaussianNoiseDataModule(DigitsDataModule(image_size=8), sigma=0.25, seed=3)
    example.setup("fit")
    shipped.setup("fit")
    x, y = example.train_set.tensors()
    clean, _ = example.base.train_set.tensors()
    assert torch.equal(x, shipped.train_set.tensors()[0]) and torch.equal(y, shipped.train_set.tensors()[1])
    assert 0.2 < float((x - clean).std()) < 0.3  # it really adds noise of std sigma
    assert example.val_set is example.base.val_set and example.test_set is example.base.test_set
