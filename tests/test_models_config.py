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
    from clpoison.ssl import check_algorithm

    # the config knows settings, not algorithms: the name is checked where algorithms live
    with pytest.raises(ClpoisonError, match="unknown algorithm 'simsiam'; choose one of simclr, "
                                            "mocov2, byol, supervised"):
        check_algorithm(load_config("mini", "simsiam").ssl.algorithm)
    with pytest.raises(ClpoisonError, match="train has"):
        load_config("mini", overrides=["train.epoch=3"])
    with pytest.raises(ClpoisonError, match="KEY=VALUE"):
        load_config("mini", overrides=["train.epochs"])
    with pytest.raises(ClpoisonError, match="expected int"):
        load_config("mini", overrides=["train.epochs=abc"])


def test_attack_settings_are_checked():
    from clpoison.attacks import cp_config

    cfg = load_config("mini", "simclr", ["attack.epsilon=8/255", "attack.cp-c.rounds=3"])
    a = cp_config(cfg, "cp-c")
    assert a.epsilon == pytest.approx(8 / 255) and a.rounds == 3 and a.kind == "class"
    with pytest.raises(ClpoisonError, match="unknown attack section"):
        cp_config(load_config("mini", "simclr", ["attack.cp_c.rounds=5"]), "cp-c")
    with pytest.raises(ClpoisonError, match="expected int"):
        cp_config(load_config("mini", "simclr", ["attack.cp-c.rounds=many"]), "cp-c")
    with pytest.raises(ClpoisonError, match="pgd_steps"):
        cp_config(load_config("mini", "simclr", ["attack.cp-s.pgd_steps=0"]), "cp-s")
    assert cp_config(load_config("paper", "byol"), "cp-s").pgd_steps == 1
    assert cp_config(load_config("paper", "mocov2"), "cp-s").dual_branch is True


def test_augment_section_is_the_augmentation_config():
    """One augmentation config: YAML/override lists become its tuples, a bad value is refused at
    once, and the whole config goes through JSON and back."""
    import json

    from clpoison.augment import AugmentConfig
    from clpoison.config import config_from_dict

    cfg = load_config("mini", "simclr", ["augment.scale=[0.08,1.0]", "augment.antialias=false"])
    assert isinstance(cfg.augment, AugmentConfig)
    assert cfg.augment.scale == (0.08, 1.0) and cfg.augment.antialias is False
    assert load_config("mini", "simclr", {"augment.ratio": [0.5, 2]}).augment.ratio == (0.5, 2.0)
    with pytest.raises(ClpoisonError, match="augment scale"):
        load_config("mini", "simclr", ["augment.scale=[1.0,0.5]"])
    back = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.augment == cfg.augment and back.to_dict() == cfg.to_dict()
