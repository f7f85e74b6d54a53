import pytest
import torch

from lightning_defense.attacks import AttackSuccessRate


def test_targeted_counts_adversarial_predictions_from_logits_or_labels():
    metric = AttackSuccessRate("targeted")
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    metric.update(logits, torch.tensor([1, 2, 2]))  # hit, miss, hit
    metric.update(torch.tensor([0]), torch.tensor([0]))  # hit
    assert metric.compute().item() == pytest.approx(3 / 4)


def test_backdoor_rate_of_triggered_inputs_reaching_the_target_class():
    metric = AttackSuccessRate("backdoor")
    metric.update(torch.tensor([5, 5, 1, 5, 2]), torch.full((5,), 5))
    assert metric.compute().item() == pytest.approx(3 / 5)


def test_indiscriminate_is_the_accuracy_drop():
    metric = AttackSuccessRate("indiscriminate", clean_accuracy=0.9)
    metric.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0]))  # 50% accuracy
    assert metric.compute().item() == pytest.approx(0.4)
    metric.reset()
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]))  # a "poison" that helps: negative drop
    assert metric.compute().item() == pytest.approx(-0.1)


def test_argument_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        AttackSuccessRate("untargeted")
    with pytest.raises(ValueError, match="needs clean_accuracy"):
        AttackSuccessRate("indiscriminate")
    with pytest.raises(ValueError, match="only used with kind='indiscriminate'"):
        AttackSuccessRate("targeted", clean_accuracy=0.5)
    metric = AttackSuccessRate("targeted")
    with pytest.raises(ValueError, match="same inputs"):
        metric.update(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
