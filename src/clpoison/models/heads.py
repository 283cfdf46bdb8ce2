"""Projection and prediction heads (MLPs) for contrastive methods.

Example::

    head = MLPHead(512, 512, 128)                    # SimCLR / MoCo v2 projector
    projector = MLPHead(512, 4096, 256, batch_norm=True)   # BYOL projector
    z = head(torch.randn(8, 512))                    # (8, 128)
"""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear -> [BN] -> ReLU -> Linear. ``batch_norm`` follows BYOL's projector/predictor."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False):
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)
        self.out_dim = out_dim


class Classifier(nn.Module):
    """An encoder followed by one linear layer: the supervised victim / surrogate.

    Example::

        model = Classifier(resnet18(width=16), num_classes=10)
        logits = model(torch.rand(8, 3, 32, 32))        # (8, 10)
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x):
        return self.fc(self.encoder(x))
