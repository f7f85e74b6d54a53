"""core.pixels: a user's batches and datasets as [0, 1] pixels, and back in the user's own form."""

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as V

from lightning_defense.core.batch import IndexedDataset
from lightning_defense.core.pixels import Layout, PixelSpace, PixelView, pixel_triples, split_transform
from tests.integration.projects import dict_batches, image_folder, torchvision_style


def test_layout_finds_images_in_tuples_triples_and_dicts():
    x, y = torch.rand(4, 1, 2, 2), torch.arange(4)
    assert Layout.detect((x, y)) == Layout(0, 1, None, 2)
    assert Layout.detect([x, y, torch.arange(4)]).native
    layout = Layout.detect({"pixel_values": x, "target": y})
    assert (layout.image, layout.label, layout.index) == ("pixel_values", "target", None)
    replaced = layout.with_image({"pixel_values": x, "target": y, "meta": "kept"}, x + 1)
    assert torch.equal(replaced["pixel_values"], x + 1) and replaced["meta"] == "kept"
    with pytest.raises(ValueError, match="image_key="):
        Layout.detect({"a": x, "b": y})
    assert Layout.detect({"a": x, "b": y}, image_key="a", label_key="b").split({"a": x, "b": y})[0] is x


def test_pixel_space_round_trips_and_checks_without_clamping():
    space = PixelSpace.of(((0.5, 0.4, 0.3), (0.2, 0.25, 0.5)))
    p = torch.rand(2, 3, 4, 4)
    assert torch.allclose(space.to_pixels(space.from_pixels(p)), p, atol=1e-6)
    space.check(space.to_pixels(space.from_pixels(p)), "test")
    with pytest.raises(ValueError, match="normalization=") as error:
        PixelSpace().check(torch.full((1, 1, 2, 2), -1.0), "FriendsNoise")
    assert "never clamps" in str(error.value)
    with pytest.raises(ValueError, match="std"):
        PixelSpace.of(((0.5,), (0.0,)))
    module = torch.nn.Identity()
    assert PixelSpace().model(module) is module  # identity: the user's module itself (byte-identical path)
    assert torch.allclose(space.model(module)(p), space.from_pixels(p))


@pytest.mark.parametrize("compose", [T.Compose, V.Compose])
def test_split_transform_moves_the_conversion_ahead_of_the_random_ops(compose):
    to_tensor = [T.ToTensor()] if compose is T.Compose else [V.ToImage(), V.ToDtype(torch.float32, scale=True)]
    normalize = (T if compose is T.Compose else V).Normalize((0.5,), (0.25,))
    split = split_transform(compose([T.RandomHorizontalFlip(1.0), *to_tensor, normalize]))
    assert split.random and split.space == PixelSpace((0.5,), (0.25,))
    from PIL import Image

    image = Image.fromarray((torch.arange(16, dtype=torch.uint8) * 10).view(4, 4).numpy())
    pixels = split.prefix(image)
    assert pixels.dtype == torch.float32 and float(pixels.max()) <= 1.0
    assert torch.allclose(split.tail(pixels), (pixels.flip(-1) - 0.5) / 0.25)
    assert split_transform(lambda image: image) is None


def test_view_reads_pixels_without_augmentation_and_dresses_back_with_it():
    dm = torchvision_style.CIFARDataModule()
    dm.setup()
    view = PixelView(dm.cifar_train)
    assert not view.native and view.augments and view.space.mean == torchvision_style.MEAN
    images, labels = view.tensors()
    expected = torch.from_numpy(dm.cifar_train.data).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(images, expected) and labels.tolist() == dm.cifar_train.targets
    assert dm.cifar_train.transform.transforms[0].__class__.__name__ == "RandomCrop"  # the user's object is untouched
    dressed = view.dress(IndexedDataset(images, labels))
    reads = torch.stack([dressed[0][0] for _ in range(20)])
    assert reads.min() < 0 and not torch.equal(reads[0], reads.amax(0))  # normalised, and augmented afresh
    assert isinstance(dressed[0], tuple) and dressed[0][1] == labels[0]


def test_view_of_dicts_needs_the_normalization_once_and_says_so():
    dm = dict_batches.StripesDataModule()
    dm.setup()
    with pytest.raises(ValueError, match="normalization="):
        PixelView(dm.train_ds, owner=dm).tensors("FriendsNoise")
    dm.normalization = ((dict_batches.MEAN,), (dict_batches.STD,))
    view = PixelView(dm.train_ds, owner=dm)
    images, _ = view.tensors()
    assert torch.allclose(images, dm.train_ds.pixels, atol=1e-6)
    item = view.dress(pixel_triples(view))[3]
    assert set(item) == {"image", "label"} and torch.allclose(item["image"], dm.train_ds[3]["image"], atol=1e-6)


def test_view_through_random_split_subsets_of_an_image_folder(tmp_path):
    dm = image_folder.FolderDataModule(str(image_folder.write_image_folder(tmp_path / "folder")))
    dm.setup()
    view = PixelView(dm.train_ds)
    images, labels = view.tensors()
    assert images.shape == (32, 3, image_folder.SIZE, image_folder.SIZE) and view.space.mean == (0.5, 0.5, 0.5)
    assert labels.tolist() == [dm.train_ds.dataset.targets[i] for i in dm.train_ds.indices]


def test_view_refuses_augmentation_it_cannot_separate():
    class Jittery(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(1, 2, 2), 0  # random inside __getitem__, not a torchvision transform

    with pytest.raises(ValueError, match="changes from one read to the next"):
        PixelView(Jittery()).tensors("FriendsNoise")


def test_native_datasets_pass_through_unchanged():
    data = IndexedDataset(torch.rand(6, 1, 2, 2), torch.arange(6))
    view = PixelView(data)
    assert view.native and pixel_triples(view) is data and view.dress(data) is data


def test_a_defense_reads_another_defenses_output_as_its_pixels():
    """A wrapper's dressed set (with the user's augmentation tail) read by FRIENDS: its pixels, not a refusal."""
    dm = torchvision_style.CIFARDataModule()
    dm.setup()
    view = PixelView(dm.cifar_train)
    images, labels = view.tensors()
    rewritten = IndexedDataset((images * 0.5).contiguous(), labels)
    again = PixelView(view.dress(rewritten))
    assert not again.native and again.augments and again.space == view.space
    assert torch.equal(again.tensors()[0], images * 0.5)
    assert isinstance(again.dress(rewritten)[0], tuple)


def test_dict_keys_named_once_on_the_datamodule():
    class Named(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return {"pic": torch.full((1, 2, 2), 0.25 * index), "cls": index}

    class DataModule:
        image_key, label_key = "pic", "cls"

    with pytest.raises(ValueError, match="image_key attribute on your dataset or datamodule"):
        PixelView(Named())
    view = PixelView(Named(), owner=DataModule())
    images, labels = view.tensors()
    assert (view.layout.image, view.layout.label) == ("pic", "cls") and labels.tolist() == [0, 1, 2]
    assert view.dress(IndexedDataset(images, labels))[2]["pic"][0, 0, 0] == 0.5
