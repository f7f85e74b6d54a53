import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_defense.callbacks import WarmStart
from lightning_defense.datamodules import DigitsDataModule, GaussianNoiseDataModule
from tests.callbacks.ddp_training_defenses_script import Crash, RecordImages, run, tiny_digits, tiny_model, trainer_kwargs

WRAPPER = "lightning_defense.datamodules.GaussianNoiseDataModule"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"epochs": 0, "wrapper": WRAPPER}, ValueError, "epochs must be an integer >= 1.*got 0"),
        ({"epochs": 2}, ValueError, "exactly one of purified=.*or wrapper="),
        ({"purified": GaussianNoiseDataModule(tiny_digits()), "wrapper": WRAPPER}, ValueError, "exactly one"),
        ({"purified": "not a datamodule"}, TypeError, "purified must be a LightningDataModule; got str"),
        ({"wrapper": "no_such_module.Purifier"}, ValueError, "wrapper: cannot import class_path 'no_such_module.Purifier'"),
        ({"wrapper": "torch.nn.Linear"}, ValueError, "is not a LightningDataModule class"),
        ({"wrapper": "Purifier"}, ValueError, "dotted class path"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        WarmStart(**kwargs)


def test_purified_set_of_another_size_is_rejected(tmp_path):
    other = GaussianNoiseDataModule(DigitsDataModule(image_size=8, val_fraction=0.1, test_fraction=0.85))
    trainer = L.Trainer(max_epochs=1, callbacks=[WarmStart(epochs=1, purified=other)], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="purified training set has .* samples but the tampered one has 180"):
        trainer.fit(tiny_model(), datamodule=tiny_digits())


def check_images(recorder, switch_epoch, tampered, purified):
    """Batches before ``switch_epoch`` hold the tampered images, later ones the purified images."""
    epochs = set()
    for epoch, seen, idx in recorder.batches:
        epochs.add(epoch)
        expected = purified[idx] if epoch >= switch_epoch else tampered[idx]
        torch.testing.assert_close(seen, expected, atol=0, rtol=0)
    return epochs


def test_switches_to_the_purified_data_after_epochs(tmp_path):
    dm = tiny_digits()
    warm = WarmStart(epochs=2, wrapper=WRAPPER, wrapper_kwargs={"sigma": 0.5})
    recorder = RecordImages()
    trainer = L.Trainer(max_epochs=4, limit_train_batches=3, callbacks=[warm, recorder], **trainer_kwargs(tmp_path))
    trainer.fit(tiny_model(), datamodule=dm)
    purified = warm.purified_datamodule
    assert isinstance(purified, GaussianNoiseDataModule) and purified.base is dm
    tampered_images, purified_images = dm.train_tensors()[0], purified.train_tensors()[0]
    assert (purified_images - tampered_images).abs().mean() > 0.3  # sigma 0.5 noise: recognisable
    assert check_images(recorder, 2, tampered_images, purified_images) == {0, 1, 2, 3}
    assert warm.state_dict() == {"switched_at": 2}
    assert dm.train_set is not purified.train_set  # the user's datamodule is left as it was


def test_crash_after_the_switch_resumes_on_purified_data(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True, max_epochs=4, limit_train_batches=3)
    purified = GaussianNoiseDataModule(tiny_digits(), sigma=0.5, seed=3)  # the instance form
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        L.Trainer(callbacks=[WarmStart(epochs=1, purified=purified), checkpoint, Crash(epoch=2)], **kwargs).fit(
            tiny_model(), datamodule=tiny_digits()
        )
    dm, recorder = tiny_digits(), RecordImages()
    warm = WarmStart(epochs=1, purified=GaussianNoiseDataModule(tiny_digits(), sigma=0.5, seed=3))
    trainer = L.Trainer(callbacks=[warm, recorder], **{**kwargs, "enable_checkpointing": False})
    trainer.fit(tiny_model(), datamodule=dm, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.current_epoch == 4 and recorder.batches[0][0] == 2  # resumed at epoch 2
    purified_images = warm.purified_datamodule.train_tensors()[0]
    assert check_images(recorder, 0, dm.train_tensors()[0], purified_images) == {2, 3}


def test_ddp_two_processes_train_on_the_same_data_as_one(tmp_path, training_defenses_ddp):
    run("warm", 1, tmp_path)
    one, two = torch.load(tmp_path / "warm.pt"), torch.load(training_defenses_ddp / "warm.pt")

    def by_epoch(rows):
        out = {}
        for epoch in (0, 1):
            r = rows[rows[:, 0] == epoch]
            order = r[:, 1].argsort()
            out[epoch] = (r[order, 1], r[order, 2])
        return out

    one, two = by_epoch(one), by_epoch(two)
    dm = tiny_digits()
    dm.setup("fit")
    tampered_sums = dm.train_tensors()[0].double().flatten(1).sum(1)
    for epoch in (0, 1):
        torch.testing.assert_close(one[epoch][0], torch.arange(180, dtype=torch.float64))  # every sample once
        torch.testing.assert_close(two[epoch][0], one[epoch][0])
        torch.testing.assert_close(two[epoch][1], one[epoch][1], atol=1e-6, rtol=0)
    torch.testing.assert_close(one[0][1], tampered_sums, atol=1e-6, rtol=0)
    assert (one[1][1] - tampered_sums).abs().mean() > 1.0  # epoch 1 is the noised (purified) data
