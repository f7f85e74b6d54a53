"""Stacked layers (models.grouped): G copies of a backbone as one network give each copy's own outputs and gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_defense.models.airbench import AirbenchNet
from lightning_defense.models.backbones import CifarResNet18, SmallCNN
from lightning_defense.models.grouped import can_stack, stack_layers


def stacked_call(network, xs):
    g, b = xs.shape[:2]
    return network(xs.transpose(0, 1).reshape(b, -1, *xs.shape[3:])).view(b, g, -1).transpose(0, 1)


@pytest.mark.parametrize("build, shape", [
    (lambda: SmallCNN(10, 1, width=4), (1, 8, 8)),
    (lambda: SmallCNN(10, 3, width=4, norm="group"), (3, 8, 8)),
    (lambda: CifarResNet18(10, 3), (3, 8, 8)),
    (lambda: AirbenchNet(10, 3, widths=(8, 16, 16)), (3, 8, 8)),
], ids=["small-cnn-batchnorm", "small-cnn-groupnorm", "resnet18", "airbench"])
def test_stacked_network_computes_each_models_outputs_gradients_and_statistics(build, shape):
    torch.manual_seed(0)
    models = [build().train() for _ in range(3)]
    xs, ys = torch.rand(3, 6, *shape), torch.randint(0, 10, (3, 6))
    network = stack_layers(models).train()
    logits = stacked_call(network, xs)
    alone = torch.stack([m(x) for m, x in zip(models, xs)])
    torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1])  # three different models, not one repeated

    # the gradient of the summed losses is each model's own gradient, in its block of the stacked tensors
    F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(3, -1).mean(1).sum().backward()
    # the same forward pass (the running statistics move once); model g's loss reaches only model g
    sum(F.cross_entropy(logit, y) for logit, y in zip(alone, ys)).backward()
    # a weight its model keeps fixed (airbench's whitening stem, its BatchNorm scales) stays fixed when stacked
    for name, p in network.named_parameters():
        assert p.requires_grad == dict(models[0].named_parameters())[name].requires_grad, name
    first_conv = next(n for n, p in network.named_parameters() if p.dim() == 4 and p.requires_grad)
    grad = dict(network.named_parameters())[first_conv].grad
    scale = lambda t: 1e-3 * t.abs().max().item()  # noqa: E731  (float sums in another order: ResNet-18 is deep)
    own = torch.cat([dict(m.named_parameters())[first_conv].grad for m in models])
    torch.testing.assert_close(grad, own, rtol=1e-3, atol=scale(own))
    head, own = dict(network.named_parameters())["fc.weight"].grad, torch.stack([m.fc.weight.grad for m in models])
    torch.testing.assert_close(head, own, rtol=1e-3, atol=scale(own))

    # BatchNorm running statistics: each model's channels hold that model's own
    bns = [n for n, mod in network.named_modules() if isinstance(mod, nn.BatchNorm2d)]
    for name in bns[:2]:
        torch.testing.assert_close(network.get_submodule(name).running_mean,
                                   torch.cat([m.get_submodule(name).running_mean for m in models]))
    network.eval()
    for m in models:
        m.eval()
    torch.testing.assert_close(stacked_call(network, xs), torch.stack([m(x) for m, x in zip(models, xs)]),
                               rtol=1e-4, atol=1e-5)


def test_a_backbone_it_does_not_know_is_refused():
    class Custom(nn.Module):  # a forward that could mix channels: not stacked
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x).mean(1)

    assert not can_stack(Custom())
    with pytest.raises(TypeError, match="cannot stack.*Custom.*vmap"):
        stack_layers([Custom(), Custom()])
    with pytest.raises(TypeError, match="cannot stack"):
        stack_layers([SmallCNN(10, 1, 4), CifarResNet18(10, 1)])


def test_stacked_copies_keep_the_models_dtype():
    """Float64 models stack as float64 (and bfloat16 as bfloat16), weights, biases and running statistics alike."""
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.bfloat16):
        models = [SmallCNN(10, 1, width=4).to(dtype).eval() for _ in range(2)]
        network = stack_layers(models).eval()
        assert {t.dtype for t in (*network.parameters(), *network.buffers()) if t.is_floating_point()} == {dtype}
    xs = torch.rand(2, 5, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(stacked_call(network.double(), xs), torch.stack([m.double()(x) for m, x in zip(models, xs)]))
