"""Issue #16: FriendsNoise, AdversarialTraining and DPSGD on projects written as the Lightning/torchvision docs
write them (tests/integration/projects): ``(x, y)`` and dict batches, normalised images, augmentation in the
dataset's transform. Every test checks, in [0, 1] pixel space, that the defense acted and that the batches
reaching the user's own ``training_step`` are still in the user's normalised space."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_defense.callbacks import DPSGD, AdversarialTraining, FriendsNoise, generate_friendly_noise
from lightning_defense.callbacks import friends_noise
from lightning_defense.core.pixels import PixelSpace, PixelView
from tests.integration.projects import dict_batches, image_folder
from tests.integration.projects import torchvision_style as tv

ZETA = 16 / 255
TOL = 1e-5  # float rounding of (p - mean) / std * std + mean


class Batches(L.Callback):
    """Records ``(epoch, images, labels)`` of every training batch at ``on_train_batch_start`` (copies)."""

    def __init__(self, image=0, label=1):
        self.image, self.label, self.rows = image, label, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.current_epoch, batch[self.image].clone(), batch[self.label].clone()))


def _fit(model, dm, callbacks, kwargs, epochs=2):
    trainer = L.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=callbacks, **kwargs)
    trainer.fit(model, datamodule=dm)
    return trainer


def _crops_and_flips(images, padding=2):
    """Every RandomCrop(size, padding) (zero fill) and horizontal flip of ``images``: (N * 2 * (2p+1)^2, C, H, W)."""
    size = images.shape[-1]
    padded = F.pad(images, (padding,) * 4)
    crops = [padded[..., dy:dy + size, dx:dx + size] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    crops = torch.stack(crops, 1)  # (N, V, C, H, W)
    return torch.cat([crops, crops.flip(-1)], 1)


def _nearest(seen, candidates):
    """For each seen image, the l_inf distance to the closest candidate (of (N, V, C, H, W) variants of N
    samples, or (N, C, H, W)), the sample it belongs to and which variant it is."""
    flat = candidates.flatten(0, 1) if candidates.ndim == 5 else candidates
    per_sample = len(flat) // len(candidates)
    dist = (seen.flatten(1)[:, None] - flat.flatten(1)[None]).abs().amax(-1)
    best, where = dist.min(1)
    return best, where // per_sample, where % per_sample


def _check_normalised(x, space):
    """x is in the user's normalised space: it has values below 0 (nothing clamped to [0, 1] there), and
    un-normalised it lies in [0, 1]."""
    pixels = space.to_pixels(x)
    assert x.min() < -0.5, "the batch reaching training_step was clamped to [0, 1] in normalised space"
    assert pixels.min() >= -TOL and pixels.max() <= 1 + TOL
    return pixels


# --------------------------------------------------------------------------- FriendsNoise
def test_friends_on_a_torchvision_project_adds_aligned_noise_before_augmentation(quiet_trainer_kwargs):
    L.seed_everything(0)
    dm, model = tv.CIFARDataModule(), tv.LitClassifier()
    initial = copy.deepcopy(model)
    friends = FriendsNoise(begin_epoch=0, noise_type=None, steps=3, batch_size=16)
    seen = Batches()
    _fit(model, dm, [friends, seen], quiet_trainer_kwargs)  # LitClassifier's `x, y = batch` runs unchanged

    space = PixelSpace.of((tv.MEAN, tv.STD))
    view = PixelView(dm.cifar_train)
    pixels, labels = view.tensors()
    assert view.space == space and view.augments
    friendly = friends.friendly_noise
    assert friendly.shape == (48, 3, 8, 8) and friendly.abs().max() <= ZETA + 1e-6 and friendly.abs().mean() > 1 / 255
    # Algorithm 1 ran on the un-augmented pixels, with the model reading them through the user's Normalize
    expected = generate_friendly_noise(space.model(initial.eval()), pixels, torch.arange(48), zeta=ZETA, steps=3,
                                       loss_scale=16.0)
    assert (friendly - expected).abs().max() <= ZETA / 127 + 1e-6  # the int8 grid

    noisy = (pixels + friendly).clamp(0, 1)
    assert len(seen.rows) == 6
    for _, x, y in seen.rows:
        seen_pixels = _check_normalised(x, space)
        # every training image is a crop/flip of its own sample's pixels + friendly noise: noise before augmentation
        best, sample, _ = _nearest(seen_pixels, _crops_and_flips(noisy))
        assert best.max() < TOL and torch.equal(labels[sample], y)
        assert _nearest(seen_pixels, _crops_and_flips(pixels))[0].min() > 1 / 255  # the noise is really there


class WithWorkers(tv.CIFARDataModule):
    def __init__(self, **loader):
        super().__init__()
        self.loader = loader

    def train_dataloader(self):
        return DataLoader(self.cifar_train, batch_size=self.batch_size, shuffle=True, **self.loader)


def test_friends_per_sample_noise_is_keyed_and_reaches_dataloader_workers(quiet_trainer_kwargs):
    L.seed_everything(0)
    mu = 4 / 255
    friends = FriendsNoise(begin_epoch=1, noise_type="bernoulli", noise_eps=mu, steps=2, batch_size=16)
    seen, dm = Batches(), WithWorkers(num_workers=2)
    trainer = _fit(tv.LitClassifier(), dm, [friends, seen], quiet_trainer_kwargs)
    noisy_set = trainer.train_dataloader.dataset.pixels
    assert isinstance(noisy_set, friends_noise.FriendlyPixels)
    view = PixelView(dm.cifar_train)
    friendly, space = friends.friendly_noise, view.space

    def items(epoch):
        noisy_set.epoch = epoch
        return torch.stack([noisy_set[i][0] for i in range(48)])

    # item i = clamp(pixels_i + friendly_i + mu_i): friendly noise from begin_epoch on, random noise keyed by (epoch, i)
    for epoch in (0, 1):
        got = items(epoch)
        assert torch.equal(got, items(epoch)) and not torch.equal(got, items(epoch + 2))
        for i in range(48):
            base = view.item_pixels(i)[0] + (friendly[i] if epoch >= 1 else 0)
            inside = (base > mu) & (base < 1 - mu)  # where the clamp did not act
            assert inside.float().mean() > 0.3
            assert torch.allclose((got[i] - base)[inside].abs(), torch.full_like(base[inside], mu), atol=TOL)
            assert noisy_set[i][2] == i and noisy_set[i][1] == dm.cifar_train.targets[i]
    # the workers sent exactly those items, cropped, flipped, normalised: epoch 1's friendly noise reached them
    for epoch, x, _ in seen.rows:
        best, _, _ = _nearest(_check_normalised(x, space), _crops_and_flips(items(epoch)))
        assert best.max() < TOL


@pytest.mark.parametrize("loader, match", [
    ({"num_workers": 2}, r"begin_epoch=0\) would generate .* first epoch .*num_workers=0 .*begin_epoch >= 1"),
    ({"num_workers": 2, "persistent_workers": True}, r"persistent_workers=True .*persistent_workers=False"),
])
def test_friends_refuses_loaders_whose_workers_would_miss_the_noise(quiet_trainer_kwargs, loader, match):
    with pytest.raises(ValueError, match=match):
        _fit(tv.LitClassifier(), WithWorkers(**loader), [FriendsNoise(begin_epoch=0, steps=1)], quiet_trainer_kwargs)


def test_friends_on_dict_batches_with_the_normalization_given_once(quiet_trainer_kwargs):
    L.seed_everything(0)
    dm = dict_batches.StripesDataModule()
    dm.normalization = ((dict_batches.MEAN,), (dict_batches.STD,))  # the user's one changed line
    friends = FriendsNoise(begin_epoch=0, noise_type=None, steps=3, batch_size=16)
    seen = Batches("image", "label")
    _fit(dict_batches.StripesClassifier(), dm, [friends, seen], quiet_trainer_kwargs)
    friendly, pixels, labels = friends.friendly_noise, dm.train_ds.pixels, dm.train_ds.labels
    assert friendly.shape == (48, 1, 8, 8) and friendly.abs().max() <= ZETA + 1e-6 and friendly.abs().mean() > 1 / 255
    space = PixelSpace.of(dm.normalization)
    for _, x, y in seen.rows:
        best, sample, _ = _nearest(_check_normalised(x, space), (pixels + friendly).clamp(0, 1))
        assert best.max() < TOL and torch.equal(labels[sample], y)


def test_friends_on_dict_batches_without_a_normalization_names_the_fix(quiet_trainer_kwargs):
    with pytest.raises(ValueError, match=r"FriendsNoise: got training image values in \[-?[0-9.]+, [0-9.]+\], outside "
                                         r"\[0, 1\].*never clamps.*normalization=\(\(mean"):
        _fit(dict_batches.StripesClassifier(), dict_batches.StripesDataModule(), [FriendsNoise(begin_epoch=0, steps=1)],
             quiet_trainer_kwargs)


class FlippedTriples(Dataset):
    """Pixels in [0, 1] as (image, label, index) triples, flipped at random by the dataset's own transform: old
    FriendsNoise added each sample's friendly noise to the flipped image, misaligned with what it was made for."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.data = (torch.rand(32, 8, 8, 3, generator=g) * 255).to(torch.uint8)
        self.targets = torch.randint(0, 3, (32,), generator=g).tolist()
        self.transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor()])

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index].numpy())), self.targets[index], index


class TripleModule(tv.LitClassifier):
    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self(x), y)


def test_friendly_noise_is_flipped_with_its_sample_not_added_after_the_flip(quiet_trainer_kwargs):
    L.seed_everything(0)
    dataset, seen = FlippedTriples(), Batches()
    friends = FriendsNoise(begin_epoch=0, noise_type=None, steps=3, batch_size=16)
    trainer = L.Trainer(max_epochs=2, callbacks=[friends, seen], **quiet_trainer_kwargs)
    trainer.fit(TripleModule(), train_dataloaders=DataLoader(dataset, batch_size=16, shuffle=True))
    pixels = torch.stack([T.ToTensor()(Image.fromarray(d.numpy())) for d in dataset.data])
    noisy = (pixels + friends.friendly_noise).clamp(0, 1)
    flipped = []
    for _, x, _ in seen.rows:  # each image is its sample's noisy pixels, or their mirror image
        best, _, variant = _nearest(x, torch.stack([noisy, noisy.flip(-1)], 1))
        assert best.max() < TOL
        flipped.append(variant)
    assert len(seen.rows) == 4 and 0 < torch.cat(flipped).float().mean() < 1  # the dataset did flip some


# --------------------------------------------------------------------------- AdversarialTraining
def _folder_project(tmp_path):
    return image_folder.FolderDataModule(str(image_folder.write_image_folder(tmp_path / "images"))), \
        image_folder.FolderClassifier(), (image_folder.MEAN, image_folder.STD), 0, 1


def _torchvision_project(tmp_path):
    return tv.CIFARDataModule(), tv.LitClassifier(), (tv.MEAN, tv.STD), 0, 1


def _dict_project(tmp_path):
    dm = dict_batches.StripesDataModule()
    dm.normalization = ((dict_batches.MEAN,), (dict_batches.STD,))
    return dm, dict_batches.StripesClassifier(), dm.normalization, "image", "label"


@pytest.mark.parametrize("project", [_torchvision_project, _folder_project, _dict_project])
def test_adversarial_training_keeps_its_eps_ball_in_pixel_space(quiet_trainer_kwargs, tmp_path, project):
    L.seed_everything(0)
    dm, model, normalization, image, label = project(tmp_path)
    eps = 8 / 255
    before, after = Batches(image, label), Batches(image, label)
    _fit(model, dm, [before, AdversarialTraining(eps=eps, steps=3), after], quiet_trainer_kwargs)
    space = PixelSpace.of(normalization)
    assert len(before.rows) == len(after.rows) > 0
    for (_, clean, y0), (_, attacked, y1) in zip(before.rows, after.rows):
        delta = _check_normalised(attacked, space) - _check_normalised(clean, space)
        assert delta.abs().max() <= eps + TOL and delta.abs().mean() > eps / 4 and torch.equal(y0, y1)


# --------------------------------------------------------------------------- DPSGD
class Spy:
    """Counts Opacus' clipping and noise calls and checks them: per-sample clipping to C, noise added after."""

    def __init__(self, monkeypatch, clip):
        from opacus.optimizers import DPOptimizer

        self.clipped, self.noised, self.sizes, self.clip_acted = 0, 0, [], False
        real_clip, real_noise = DPOptimizer.clip_and_accumulate, DPOptimizer.add_noise

        def clip_and_accumulate(opt):
            per_sample = opt.grad_samples
            n = len(per_sample[0])
            norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in per_sample]).sum(0).sqrt() if n else torch.zeros(0)
            real_clip(opt)
            total = math.sqrt(sum(float(p.summed_grad.pow(2).sum()) for p in opt.params))
            assert total <= n * clip * (1 + 1e-4) + 1e-6
            self.clip_acted |= bool((norms > clip).any())
            self.clipped, self.sizes = self.clipped + 1, self.sizes + [n]

        def add_noise(opt):
            summed = [p.summed_grad.clone() for p in opt.params]
            real_noise(opt)
            assert all(not torch.equal(p.grad.view_as(s), s) for p, s in zip(opt.params, summed))
            self.noised += 1

        monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", clip_and_accumulate)
        monkeypatch.setattr(DPOptimizer, "add_noise", add_noise)


@pytest.mark.parametrize("project", [_torchvision_project, _dict_project])
def test_dp_sgd_on_user_projects_clips_noises_and_accounts(quiet_trainer_kwargs, tmp_path, monkeypatch, project):
    from opacus.data_loader import DPDataLoader

    L.seed_everything(0)
    dm, model, _, _, _ = project(tmp_path)
    spy = Spy(monkeypatch, clip=0.1)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=0.1, replace_batchnorm=True)
    trainer = _fit(model, dm, [dp], quiet_trainer_kwargs)
    assert isinstance(trainer.train_dataloader, DPDataLoader)
    assert spy.clipped == spy.noised == trainer.global_step > 0 and spy.clip_acted
    assert len(set(spy.sizes)) > 1  # Poisson batches
    assert sum(steps for _, _, steps in dp._accountant.history) == trainer.global_step
    assert 0 < dp.epsilon < math.inf


def test_dp_sgd_survives_an_empty_first_poisson_batch_of_dicts(quiet_trainer_kwargs):
    """Opacus builds an empty first batch from dataset[0]'s fields: for a dict sample, from its keys (a crash)."""
    L.seed_everything(0)
    seen = Batches("image", "label")
    dp = DPSGD(seed=5)  # with 48 samples at rate 1/48 its sampler draws an empty first batch
    _fit(dict_batches.StripesClassifier(), dict_batches.StripesDataModule(batch_size=1), [dp, seen],
         quiet_trainer_kwargs, epochs=1)
    first = seen.rows[0]
    assert first[1].shape == (0, 1, 8, 8) and first[2].shape == (0,) and first[2].dtype == torch.long
    assert any(len(x) for _, x, _ in seen.rows) and dp.epsilon > 0
