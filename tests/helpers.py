"""Shared test utilities: deterministic random weights and statistics for any model."""

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics, so that eval
    mode is not an identity and train-mode updates are visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model
