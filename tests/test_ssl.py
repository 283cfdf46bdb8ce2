"""Losses against hand-computed cases, MoCo queue / EMA, BYOL EMA, and the dual-branch switch."""

import math

import pytest
import torch

from clpoison.errors import ClpoisonError
from clpoison.models import build_encoder
from clpoison.ssl import BYOL, MoCoV2, SimCLR, build_method, info_nce_loss, negative_cosine_loss, nt_xent_loss


def tiny_encoder():
    torch.manual_seed(0)
    return build_encoder("resnet18", width=4)


def test_nt_xent_hand_computed():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # anchor 0: logits (self masked) [0, 2, 0] over {z1[1], z2[0] (positive), z2[1]} at T=0.5
    expected = math.log(1 + 2 * math.exp(-2))
    assert nt_xent_loss(z, z.clone(), 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_asymmetric_case():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # positives are orthogonal, negatives aligned
    t = 1.0
    # anchor z1[0]=[1,0]: self masked; z1[1]: 0; z2[0] (pos): 0; z2[1]: 1
    per_anchor = -math.log(math.exp(0) / (math.exp(0) + math.exp(0) + math.exp(1)))
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(per_anchor, rel=1e-6)


def test_info_nce_hand_computed():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    expected = -math.log(math.e / (math.e + 1 + math.exp(-1)))
    assert info_nce_loss(q, k, queue, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_negative_cosine_hand_computed():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert negative_cosine_loss(p, z).item() == pytest.approx(-(1 / math.sqrt(2) + 1) / 2, rel=1e-6)


def test_loss_shape_errors():
    with pytest.raises(ClpoisonError, match="same shape"):
        nt_xent_loss(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ClpoisonError, match="temperature"):
        nt_xent_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ClpoisonError, match="unknown algorithm"):
        build_method("simsiam", tiny_encoder())


def test_moco_queue_and_ema():
    torch.manual_seed(0)
    moco = MoCoV2(tiny_encoder(), queue_size=10, momentum=0.9)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    before_queue = moco.queue.clone()
    key_before = [p.clone() for p in moco.key_encoder.parameters()]
    opt = torch.optim.SGD(moco.online_parameters(), lr=0.5)
    loss = moco(x1, x2)
    # a forward alone changes neither the queue nor the key encoder (poison steps rely on it)
    assert torch.equal(moco.queue, before_queue)
    loss.backward()
    opt.step()
    keys = moco._last_keys.clone()
    moco.on_step_end()
    assert torch.allclose(moco.queue[:4], keys)
    assert torch.equal(moco.queue[4:], before_queue[4:])
    assert moco.queue_ptr.item() == 4
    for k_old, k_new, q in zip(key_before, moco.key_encoder.parameters(), moco.encoder.parameters()):
        assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q, atol=1e-6)
    assert all(not p.requires_grad for p in moco.key_encoder.parameters())
    # wrap-around: 3 more steps of 4 keys each in a queue of 10
    for _ in range(3):
        moco(x1, x2)
        moco.on_step_end()
    assert moco.queue_ptr.item() == (4 * 4) % 10


def test_byol_ema_and_target_frozen():
    byol = BYOL(tiny_encoder(), proj_hidden=32, proj_dim=8, momentum=0.5)
    target_before = [p.clone() for p in byol.target_encoder.parameters()]
    opt = torch.optim.SGD(byol.online_parameters(), lr=0.1)
    byol(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)).backward()
    assert all(p.grad is None for p in byol.target_encoder.parameters())
    opt.step()
    byol.on_step_end()
    for t_old, t_new, o in zip(target_before, byol.target_encoder.parameters(), byol.encoder.parameters()):
        assert torch.allclose(t_new, 0.5 * t_old + 0.5 * o, atol=1e-6)
    assert not any(p is q for p in byol.online_parameters() for q in byol.target_encoder.parameters())


@pytest.mark.parametrize("cls", [MoCoV2, BYOL])
def test_dual_branch_changes_input_gradient(cls):
    torch.manual_seed(1)
    kwargs = {"queue_size": 16} if cls is MoCoV2 else {"proj_hidden": 32, "proj_dim": 8}
    method = cls(tiny_encoder(), **kwargs).eval()
    with torch.no_grad():  # make the target differ from the online net, as after training
        for p in (method.key_encoder if cls is MoCoV2 else method.target_encoder).parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(4, 3, 16, 16)
    grads = []
    for dual in (False, True):
        v1 = x.clone().requires_grad_(True)
        v2 = (x.flip(-1)).clone().requires_grad_(True)
        method(v1, v2, target_grad=dual).backward()
        grads.append((v1.grad.clone(), None if v2.grad is None else v2.grad.clone()))
    # MoCo: without dual-branch the key view gets no gradient; with it, it does
    if cls is MoCoV2:
        assert grads[0][1] is None and grads[1][1] is not None and grads[1][1].abs().sum() > 0
    else:
        assert not torch.allclose(grads[0][1], grads[1][1])
    assert all(p.grad is None for p in
               (method.key_encoder if cls is MoCoV2 else method.target_encoder).parameters())


def test_simclr_forward_backward_and_scale():
    enc = tiny_encoder()
    s1 = SimCLR(enc, temperature=0.5)
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    s1.eval()
    base = s1(x1, x2)
    s1.loss_scale = 0.5 / 0.07
    assert s1(x1, x2).item() == pytest.approx(base.item() * 0.5 / 0.07, rel=1e-5)


@pytest.mark.parametrize("alg", ["simclr", "mocov2", "byol"])
def test_loss_head_runs_in_fp32_under_bf16_autocast(alg):
    """ssl.fp32_loss: with the network in bf16 autocast, the loss head (normalisation,
    similarities, loss) runs in fp32, as the original; without it, in bf16: the two differ."""
    import torch.nn.functional as F

    from clpoison.models import build_encoder
    from clpoison.ssl import build_method

    torch.manual_seed(0)
    method = build_method(alg, build_encoder("resnet18", 4, "cifar")).eval()
    v1, v2 = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    losses = {}
    for fp32 in (True, False):
        method.fp32_loss = fp32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses[fp32] = method(v1, v2)
    assert losses[True].dtype == torch.float32
    if alg == "simclr":      # the same head by hand, in fp32 outside autocast
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = method.projector(method.encoder(torch.cat([v1, v2])))
            z = F.normalize(h.float(), dim=1)
            ref = nt_xent_loss(z[:8], z[8:], method.temperature) * method.loss_scale
        assert torch.equal(losses[True], ref)
    assert losses[True].float() != losses[False].float()
