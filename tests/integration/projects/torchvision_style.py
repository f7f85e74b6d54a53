"""An existing project written the way the Lightning and torchvision docs write one (no lightning_defense).

A CIFAR-like dataset with ``data`` (uint8 HWC) and ``targets``, a ``Compose([RandomCrop,
RandomHorizontalFlip, ToTensor, Normalize])`` training transform, ``x, y = batch`` in ``training_step``.
"""

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SIZE, CLASSES = 8, 3


class TinyCIFAR(Dataset):
    """Class c has a colour mean of its own, plus pixel noise: learnable in a few steps."""

    def __init__(self, n: int, seed: int, transform=None):
        rng = np.random.default_rng(seed)
        self.targets = [int(t) for t in rng.integers(0, CLASSES, n)]
        base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[self.targets]
        noise = rng.integers(-40, 40, (n, SIZE, SIZE, 3))
        self.data = np.clip(base[:, None, None, :] + noise, 0, 255).astype(np.uint8)
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class CIFARDataModule(L.LightningDataModule):
    def __init__(self, batch_size: int = 16, num_train: int = 48):
        super().__init__()
        self.batch_size, self.num_train = batch_size, num_train

    def setup(self, stage=None):
        train_transform = T.Compose([
            T.RandomCrop(SIZE, padding=2), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
        test_transform = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        self.cifar_train = TinyCIFAR(self.num_train, seed=0, transform=train_transform)
        self.cifar_val = TinyCIFAR(16, seed=1, transform=test_transform)
        self.cifar_test = TinyCIFAR(16, seed=2, transform=test_transform)

    def train_dataloader(self):
        return DataLoader(self.cifar_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.cifar_val, batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.cifar_test, batch_size=self.batch_size)


class LitClassifier(L.LightningModule):
    def __init__(self, num_classes: int = CLASSES, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(8, num_classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
