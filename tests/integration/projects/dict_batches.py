"""An existing project whose datamodule yields dict batches and normalises in ``__getitem__`` (no
lightning_defense). Grayscale 8x8 images, ``{"image": ..., "label": ...}``."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

MEAN, STD = 0.5, 0.25
SIZE, CLASSES = 8, 2


class StripesDataset(Dataset):
    """Class 0: horizontal stripes, class 1: vertical ones, plus noise; pixels in [0, 1] before normalising."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (n,), generator=g)
        stripes = (torch.arange(SIZE) % 2).float()
        horizontal, vertical = stripes[:, None].expand(SIZE, SIZE), stripes[None, :].expand(SIZE, SIZE)
        pattern = torch.where(self.labels[:, None, None] == 0, horizontal, vertical)
        self.pixels = (0.25 + 0.5 * pattern + 0.1 * torch.rand(n, SIZE, SIZE, generator=g)).clamp(0, 1)[:, None]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"image": (self.pixels[index] - MEAN) / STD, "label": self.labels[index]}


class StripesDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 16):
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage=None):
        self.train_ds, self.val_ds, self.test_ds = StripesDataset(48, 0), StripesDataset(16, 1), StripesDataset(16, 2)

    def train_dataloader(self):
        return DataLoader(self.train_ds, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_ds, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.test_ds, batch_size=self.batch_size)


class StripesClassifier(L.LightningModule):
    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self(batch["image"]).argmax(1) == batch["label"]).float().mean())

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self(batch["image"]).argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
