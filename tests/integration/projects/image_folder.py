"""An existing project built on torchvision's ``ImageFolder`` and ``random_split`` (no lightning_defense)."""

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision.datasets import ImageFolder

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
SIZE = 8


def write_image_folder(root, per_class: int = 24, seed: int = 0):
    """Two classes of PNGs (warm and cool colours) under ``root/<class>/``."""
    rng = np.random.default_rng(seed)
    for name, colour in (("cat", (180, 90, 40)), ("dog", (40, 90, 180))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-50, 50, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


class FolderDataModule(L.LightningDataModule):
    def __init__(self, root: str, batch_size: int = 16):
        super().__init__()
        self.root, self.batch_size = root, batch_size

    def setup(self, stage=None):
        transform = T.Compose([T.Resize((SIZE, SIZE)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
        full = ImageFolder(self.root, transform=transform)
        self.train_ds, self.val_ds, self.test_ds = random_split(full, [32, 8, 8], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self):
        return DataLoader(self.train_ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_ds, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_ds, batch_size=self.batch_size)


class FolderClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(8, 2))
        self.lr = lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test_acc", (self(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
