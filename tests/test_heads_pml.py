"""FullSoftmaxLoss gives the loss and gradients of pytorch-metric-learning's CosFaceLoss and
ArcFaceLoss (margin in degrees there, W stored [D, C]) given the same weights."""
import math

import pytest
import torch

from protomem.losses import FullSoftmaxLoss
from protomem.margins import ArcFace, CosFace

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize(
    "ours, make_theirs",
    [
        (CosFace(64, 0.35), lambda C, D: pml_losses.CosFaceLoss(C, D, margin=0.35, scale=64)),
        (CosFace(30, 0.2), lambda C, D: pml_losses.CosFaceLoss(C, D, margin=0.2, scale=30)),
        (ArcFace(64, 0.5), lambda C, D: pml_losses.ArcFaceLoss(C, D, margin=math.degrees(0.5), scale=64)),
        (ArcFace(16, 1.2), lambda C, D: pml_losses.ArcFaceLoss(C, D, margin=math.degrees(1.2), scale=16)),
    ],
    ids=["cosface64", "cosface30", "arcface64", "arcface16-wide"],
)
@pytest.mark.parametrize("B,D,C", [(9, 5, 7), (64, 128, 1000)])
def test_full_softmax_equals_pytorch_metric_learning(ours, make_theirs, B, D, C):
    g = torch.Generator().manual_seed(B + C)
    head = FullSoftmaxLoss(D, C, margin=ours)
    theirs = make_theirs(C, D)
    with torch.no_grad():
        theirs.W.copy_(head.weight.T)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(C, (B,), generator=g)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, lb = head(xa, y), theirs(xb, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for ours_g, theirs_g in ((xa.grad, xb.grad), (head.weight.grad, theirs.W.grad.T)):
        torch.testing.assert_close(ours_g, theirs_g, atol=1e-4 * float(theirs_g.abs().max()), rtol=1e-4)
