import pytest
import torch

from lightning_defense.datamodules import DigitsDataModule


@pytest.fixture(scope="module")
def one_thread():
    """Crafting runs many tiny double-backward passes: one thread is faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits16():
    """The digits at 16x16: (train images, train labels, test images, test labels)."""
    dm = DigitsDataModule(image_size=16)
    dm.setup()
    x, y = dm.train_tensors()
    xt, yt = dm.test_set.tensors()
    return x, y, xt, yt


@pytest.fixture(scope="session")
def small_split(digits16):
    """200 training digits at 16x16, for bound and budget checks."""
    x, y, _, _ = digits16
    return x[:200].clone(), y[:200].clone()


def accuracy_of(model, images, labels):
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def check_targeted_poisons(attack, x, y, eps, norm):
    """Shared checks of a targeted attack: bound, budget, adversarial-class poisons, goal, seeding."""
    goal = attack.sample_goal(x, y, num_classes=10, seed=4)
    assert goal.adversarial_label != goal.target_label
    poisons = attack.craft(x, y, goal=goal, seed=0)
    assert len(poisons) == 10 and (poisons.labels == goal.adversarial_label).all()
    assert (y[poisons.indices] == goal.adversarial_label).all()
    poisons.validate(x, y)
    linf, l2 = poisons.perturbation_norms(x)
    assert (linf if norm == "linf" else l2).max() <= eps + 1e-5
    assert linf.min() > 0
    assert poisons.kind == "targeted" and poisons.adversarial_labels.tolist() == [goal.adversarial_label]
    assert torch.equal(poisons.target_images[0], goal.target_image)
    again = attack.craft(x, y, goal=goal, seed=0)
    assert torch.equal(again.images, poisons.images) and torch.equal(again.indices, poisons.indices)


def check_backdoor_poisons(attack, x, y, eps, norm, count):
    """Shared checks of a backdoor attack: bound, budget, target-class poisons, trigger fields, seeding."""
    goal = attack.sample_goal(x, y, num_classes=10, seed=4)
    assert goal.source_class != goal.target_class
    poisons = attack.craft(x, y, goal=goal, seed=0)
    assert len(poisons) == count and (poisons.labels == goal.target_class).all()
    assert (y[poisons.indices] == goal.target_class).all()
    poisons.validate(x, y)
    linf, l2 = poisons.perturbation_norms(x)
    assert (linf if norm == "linf" else l2).max() <= eps + 1e-5
    assert linf.min() > 0
    assert poisons.kind == "backdoor"
    assert (poisons.source_class, poisons.target_class) == (goal.source_class, goal.target_class)
    assert poisons.trigger is not None and poisons.trigger.shape[0] == x.shape[1]
    again = attack.craft(x, y, goal=goal, seed=0)
    assert torch.equal(again.images, poisons.images) and torch.equal(again.indices, poisons.indices)
    assert torch.equal(again.trigger, poisons.trigger)
    return goal, poisons


def random_sign_control(poisons, x, eps, seed, **fields):
    """The noise control of a success test: random +-eps (l_inf) on the same samples as ``poisons``."""
    from lightning_defense.attacks.base import project
    from lightning_defense.datamodules.poison import PoisonSet

    clean = x[poisons.indices]
    signs = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return PoisonSet(poisons.indices, clean + project(signs * eps, clean, eps, "linf"), poisons.labels, "linf", eps,
                     kind=poisons.kind, **fields)
