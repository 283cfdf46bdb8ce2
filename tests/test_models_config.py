import pytest
import torch

from clpoison.config import load_config
from clpoison.errors import ClpoisonError
from clpoison.models import build_encoder


@pytest.mark.parametrize("arch,width,dim", [("resnet18", 8, 64), ("resnet34", 4, 32), ("resnet50", 4, 128)])
def test_encoder_shapes(arch, width, dim):
    enc = build_encoder(arch, width=width)
    assert enc.feature_dim == dim
    assert enc(torch.rand(2, 3, 32, 32)).shape == (2, dim)


def test_imagenet_stem():
    enc = build_encoder("resnet18", width=4, stem="imagenet")
    assert enc(torch.rand(2, 3, 64, 64)).shape == (2, 32)


def test_unknown_arch_and_stem():
    with pytest.raises(ClpoisonError, match="resnet18"):
        build_encoder("vgg11")
    with pytest.raises(ClpoisonError, match="cifar"):
        build_encoder("resnet18", stem="weird")


def test_presets_and_overrides():
    cfg = load_config("mini", "mocov2", ["train.epochs=3", "model.width=8"])
    assert cfg.train.epochs == 3 and cfg.model.width == 8 and cfg.train.lr == 0.3
    assert cfg.ssl.algorithm == "mocov2"
    paper = load_config("paper", "byol")
    assert paper.train.lr == 1.0 and paper.model.width == 64 and paper.train.epochs == 1000


def test_config_errors():
    with pytest.raises(ClpoisonError, match="unknown preset"):
        load_config("nope")
    with pytest.raises(ClpoisonError, match="unknown algorithm"):
        load_config("mini", "simsiam")
    with pytest.raises(ClpoisonError, match="train has"):
        load_config("mini", overrides=["train.epoch=3"])
    with pytest.raises(ClpoisonError, match="KEY=VALUE"):
        load_config("mini", overrides=["train.epochs"])
    with pytest.raises(ClpoisonError, match="expected int"):
        load_config("mini", overrides=["train.epochs=abc"])
