from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_defense.core.seam import DATASET, SAMPLER, SHARD, TrainingDataSeam


class Indexed(Dataset):
    """Sample i is ``(value_i, label 0, index i)``; ``offset`` tells two sets of the same indices apart."""

    def __init__(self, n: int, offset: float = 0.0) -> None:
        self.values = torch.arange(n, dtype=torch.float32) + offset

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        return self.values[i : i + 1], 0, i


def fake_trainer(training: bool = True):
    """What the seam uses of a Trainer: its strategy's ``process_dataloader`` and ``training``."""
    return SimpleNamespace(strategy=SimpleNamespace(process_dataloader=lambda loader: loader), training=training)


def shuffled(dataset, seed=0, **kwargs):
    return DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_transforms_run_in_priority_order_dataset_sampler_shard():
    trainer, calls = fake_trainer(), []
    seam = TrainingDataSeam.of(trainer)
    assert TrainingDataSeam.of(trainer) is seam  # one seam per trainer
    for name, priority in [("shard", SHARD), ("sampler", SAMPLER), ("dataset", DATASET)]:
        seam.add(name, lambda loader, is_train, name=name: calls.append((name, is_train)) or loader, priority)
    loader = DataLoader(Indexed(4))
    assert trainer.strategy.process_dataloader(loader) is loader
    assert calls == [("dataset", True), ("sampler", True), ("shard", True)]
    seam.add("sampler", lambda loader, is_train: calls.append(("sampler-2", is_train)) or loader, SAMPLER)  # replaces
    trainer.training, calls[:] = False, []
    trainer.strategy.process_dataloader(loader)
    assert calls == [("dataset", False), ("sampler-2", False), ("shard", False)]


def test_swapping_keeps_the_sampler_order():
    tampered, purified = Indexed(10), Indexed(10, offset=100.0)

    def epochs(loader, swap_after_first=None):
        out = []
        for epoch in range(3):
            out.append([(x.flatten().tolist(), idx.tolist()) for x, _, idx in loader])
            if epoch == 0 and swap_after_first is not None:
                swap_after_first()
        return out

    plain = epochs(shuffled(tampered))
    trainer = fake_trainer()
    seam = TrainingDataSeam.of(trainer)
    seam.enable_swapping()
    loader = trainer.strategy.process_dataloader(shuffled(tampered))
    swapped = epochs(loader, lambda: seam.swap_training_set(purified))
    assert [[idx for _, idx in e] for e in swapped] == [[idx for _, idx in e] for e in plain]  # same indices, same order
    assert swapped[0] == plain[0]
    for epoch in (1, 2):
        for (values, idx), (old, _) in zip(swapped[epoch], plain[epoch]):
            assert values == [100.0 + i for i in idx] and values == [v + 100.0 for v in old]


def test_a_swap_before_the_loader_exists_is_applied_when_it_is_built():
    trainer = fake_trainer()
    seam = TrainingDataSeam.of(trainer)
    seam.swap_training_set(Indexed(6, offset=50.0))
    loader = trainer.strategy.process_dataloader(DataLoader(Indexed(6), batch_size=6))
    x, _, idx = next(iter(loader))
    assert x.flatten().tolist() == [50.0 + i for i in idx.tolist()]
    trainer.training = False  # a validation loader is left alone
    x, _, _ = next(iter(trainer.strategy.process_dataloader(DataLoader(Indexed(6), batch_size=6))))
    assert x.flatten().tolist() == list(range(6))


def test_a_swap_of_another_length_is_a_clear_error():
    trainer = fake_trainer()
    seam = TrainingDataSeam.of(trainer)
    seam.enable_swapping()
    trainer.strategy.process_dataloader(DataLoader(Indexed(8), batch_size=2))
    with pytest.raises(ValueError, match="the new training set has 5 samples but the one it replaces has 8"):
        seam.swap_training_set(Indexed(5))
    pending = fake_trainer()
    TrainingDataSeam.of(pending).swap_training_set(Indexed(5))
    with pytest.raises(ValueError, match="has 5 samples but the one it replaces has 8"):
        pending.strategy.process_dataloader(DataLoader(Indexed(8), batch_size=2))


def test_swapping_refuses_persistent_workers_and_a_late_start():
    trainer = fake_trainer()
    TrainingDataSeam.of(trainer).enable_swapping()
    loader = DataLoader(Indexed(8), batch_size=2, num_workers=1, persistent_workers=True)
    with pytest.raises(ValueError, match="persistent_workers=True with num_workers=1.*persistent_workers=False"):
        trainer.strategy.process_dataloader(loader)
    late = fake_trainer()
    seam = TrainingDataSeam.of(late)
    late.strategy.process_dataloader(DataLoader(Indexed(8), batch_size=2))
    with pytest.raises(RuntimeError, match="built before enable_swapping"):
        seam.swap_training_set(Indexed(8))


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.layer(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(Indexed(12), batch_size=4, shuffle=True)

    def val_dataloader(self):
        return DataLoader(Indexed(5), batch_size=5)


class RecordLoaders(L.Callback):
    """Registers a transform in ``setup`` that records which loaders it sees, as a defense would."""

    def __init__(self) -> None:
        self.seen = []

    def setup(self, trainer, pl_module, stage):
        TrainingDataSeam.of(trainer).add("record", lambda loader, is_train: self.seen.append(
            (len(loader.dataset), is_train)) or loader, SAMPLER)


def test_transforms_see_is_train_for_train_and_val_loaders_in_a_fit(quiet_trainer_kwargs):
    record = RecordLoaders()
    trainer = L.Trainer(max_epochs=2, num_sanity_val_steps=1, callbacks=[record], **quiet_trainer_kwargs)
    trainer.fit(Tiny())
    # the sanity check's and the epochs' validation loader (5 samples) and the training loader (12), built once
    assert (12, True) in record.seen and (5, False) in record.seen
    assert all(is_train == (n == 12) for n, is_train in record.seen), record.seen
    assert record.seen.count((12, True)) == 1
