import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule, PoisonedDataModule, PoisonSet
from lightning_defense.datamodules.deep_knn import DeepKNNFilterDataModule, knn_disagreement


def test_knn_disagreement_flags_planted_inconsistent_samples():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(30)
    features = centers[labels] + torch.randn(90, 2, generator=gen)
    planted = torch.tensor([3, 40, 77])
    labels = labels.clone()
    labels[planted] = (labels[planted] + 1) % 3  # label disagrees with its neighbourhood
    flagged = knn_disagreement(features, labels, k=10, num_classes=3, chunk=16).nonzero().flatten()
    assert flagged.tolist() == planted.tolist()


def test_filters_poisoned_digits_and_reports_tp_fp():
    clean = DigitsDataModule(image_size=8)
    clean.setup()
    images, labels = clean.train_tensors()
    # feature-collision-like poisons: images of class 1 moved far from their class, labels kept
    idx = (labels == 1).nonzero().flatten()[:10]
    target = images[(labels == 7).nonzero().flatten()[0]]
    poisoned = images[idx] + (target - images[idx]).clamp(-0.9, 0.9)
    poisons = PoisonSet(indices=idx, images=poisoned.clamp(0, 1), labels=labels[idx], norm="linf", eps=0.9)
    dm = DeepKNNFilterDataModule(PoisonedDataModule(DigitsDataModule(image_size=8), poisons), k=20, epochs=3)
    dm.setup()
    report = dm.report
    assert report["poisons"] == 10 and report["true_positives"] >= 7
    assert report["removed"] == report["true_positives"] + report["false_positives"]
    assert len(dm.train_set) == len(images) - report["removed"]
    assert int((~torch.isin(idx, dm.kept_indices)).sum()) == report["true_positives"]
    assert torch.equal(dm.test_set.images, clean.test_set.images)


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k must be >= 1"), ({"epochs": 0}, "epochs must be >= 1")])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepKNNFilterDataModule(DigitsDataModule(), **kwargs)


def test_removing_every_sample_is_a_clear_error_before_any_loader():
    """Labels alternate along a line of points: with k=1 every sample's neighbour disagrees with it."""
    import lightning as L
    from torch import nn

    from lightning_defense.core.batch import IndexedDataset
    from lightning_defense.datamodules.base import ImageDataModule

    class Line(ImageDataModule):
        num_classes, num_channels = 2, 1

        def setup(self, stage=None):
            images = torch.arange(4.0).view(4, 1, 1, 1) / 4
            self.train_set = self.val_set = self.test_set = IndexedDataset(images, torch.tensor([0, 1, 0, 1]))

    class Features(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Module()
            self.backbone.forward_features = lambda x: x.flatten(1)

        def normalize(self, x):
            return x

    dm = DeepKNNFilterDataModule(Line(), k=1, feature_model=Features(), device="cpu")
    with pytest.raises(ValueError, match="removed every one of the 4 training samples"):
        dm.setup("fit")
