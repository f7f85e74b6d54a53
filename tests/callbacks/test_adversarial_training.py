import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_defense.callbacks.adversarial_training import AdversarialTraining, pgd_attack
from lightning_defense.datamodules import DigitsDataModule
from lightning_defense.models import ImageClassifier


def _model():
    return ImageClassifier("small_cnn", num_classes=10, in_chans=1, lr=0.05, flip=False, backbone_kwargs={"width": 8})


def test_pgd_stays_in_bound_and_raises_the_loss():
    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=8)
    dm.setup()
    x, y = dm.train_set.images[:256], dm.train_set.labels[:256]
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):  # a briefly trained model, so the loss surface has directions to climb
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    eps = 8 / 255
    adv = pgd_attack(model, x, y, eps=eps, steps=5, step_size=2 / 255)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    random_sign = (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
    with torch.no_grad():
        clean, noisy, attacked = (F.cross_entropy(model(v), y).item() for v in (x, random_sign, adv))
    assert attacked > 1.5 * clean and attacked > 1.5 * noisy  # PGD climbs; random signs of the same size barely do


class SeeBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.images = batch[0].clone()
        self.indices = batch[2].clone()


def test_training_batches_are_replaced_by_adversarial_examples(quiet_trainer_kwargs):
    L.seed_everything(0)
    dm = DigitsDataModule(image_size=8, batch_size=32)
    see = SeeBatch()
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[AdversarialTraining(eps=4 / 255, steps=2), see], **quiet_trainer_kwargs)
    trainer.fit(_model(), datamodule=dm)
    clean = dm.train_set.images[see.indices]
    diff = (see.images - clean).abs()
    assert diff.max() <= 4 / 255 + 1e-6 and diff.max() > 1 / 255


@pytest.mark.parametrize("kwargs, match", [({"eps": 0}, "eps must be in"), ({"steps": 0}, "steps"), ({"step_size": -1.0}, "step_size")])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialTraining(**kwargs)
