"""generate_prototypes against protomem.reference.generate_prototypes_ref."""
import pytest
import torch
from conftest import STORAGE_ATOL, random_ids

import protomem
from protomem.reference import generate_prototypes_ref

SHAPES = [(1, 1), (5, 3), (37, 129), (64, 512)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def batch(B, D, dtype, device, num_classes=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(g, num_classes or max(1, B // 3))
    labels = ids[torch.randint(len(ids), (B,), generator=g)]
    x = (torch.randn(B, D, generator=g) * 3).to(dtype)
    return x.to(device), labels.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_reference(device, dtype, B, D, weighted):
    x, labels = batch(B, D, dtype, device)
    w = torch.rand(B, device=device) + 0.1 if weighted else None
    classes, protos, inverse = protomem.generate_prototypes(x, labels, w)
    rc, rp, ri = generate_prototypes_ref(x, labels, w)
    assert protos.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(classes, rc) and torch.equal(inverse, ri)
    atol = STORAGE_ATOL[protos.dtype]
    torch.testing.assert_close(protos, rp, atol=atol, rtol=0)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones_like(protos[:, 0]), atol=10 * atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_matches_reference(device, dtype, weighted):
    x, labels = batch(37, 129, dtype, device, num_classes=9)
    w = torch.rand(37, device=device, dtype=dtype) + 0.1 if weighted else None
    g = torch.randn(9, 129, device=device, dtype=dtype)
    x1 = x.clone().requires_grad_()
    (protomem.generate_prototypes(x1, labels, w)[1] * g).sum().backward()
    x2 = x.clone().requires_grad_()
    (generate_prototypes_ref(x2, labels, w)[1] * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=STORAGE_ATOL[dtype] * 10, rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_float64(device, weighted):
    x, labels = batch(9, 5, torch.float64, device, num_classes=3)
    x.requires_grad_()
    w = torch.rand(9, dtype=torch.float64, device=device) + 0.1 if weighted else None
    assert torch.autograd.gradcheck(lambda t: protomem.generate_prototypes(t, labels, w)[1], (x,))


def test_opcheck(device):
    x, labels = batch(11, 7, torch.float32, device)
    torch.library.opcheck(torch.ops.protomem.generate_prototypes.default, (x, labels, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    x64 = x.double().requires_grad_()
    torch.library.opcheck(torch.ops.protomem.generate_prototypes.default, (x64, labels, None),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_zero_weight_class_gives_nan_prototype(device):
    x = torch.randn(4, 3, device=device)
    labels = torch.tensor([0, 0, 1, 1], device=device)
    w = torch.tensor([0.0, 0.0, 1.0, 2.0], device=device)
    _, protos, _ = protomem.generate_prototypes(x, labels, w)
    assert torch.isnan(protos[0]).all() and torch.isfinite(protos[1]).all()


def test_empty_batch(device):
    classes, protos, inverse = protomem.generate_prototypes(
        torch.empty(0, 4, device=device), torch.empty(0, dtype=torch.long, device=device))
    assert classes.shape == (0,) and protos.shape == (0, 4) and inverse.shape == (0,)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda d: (torch.randn(3, 2, device=d), torch.tensor([0, -1, 2], device=d), None), ValueError, "non-negative"),
        (lambda d: (torch.randn(3, 2, device=d), torch.tensor([0, 1, 2], dtype=torch.int32, device=d), None), TypeError, "int64"),
        (lambda d: (torch.randn(3, 2, device=d), torch.tensor([0, 1], device=d), None), ValueError, "labels.size"),
        (lambda d: (torch.randn(3, device=d), torch.tensor([0, 1, 2], device=d), None), ValueError, "x must have 2"),
        (lambda d: (torch.ones(3, 2, dtype=torch.long, device=d), torch.tensor([0, 1, 2], device=d), None), TypeError, "x must be float"),
        (lambda d: (torch.randn(3, 2, device=d), torch.tensor([0, 1, 2], device=d), torch.tensor([1.0, -1.0, 1.0], device=d)), ValueError, "weights"),
        (lambda d: (torch.randn(3, 2, device=d), torch.tensor([0, 1, 2], device=d), torch.ones(2, device=d)), ValueError, "weights.size"),
    ],
)
def test_bad_input(device, make, error, match):
    with pytest.raises(error, match=match):
        protomem.generate_prototypes(*make(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("B,D,num_classes", [(1, 3, 1), (23, 17, 5), (64, 129, 64), (300, 8, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_padded_matches_reference(device, dtype, B, D, num_classes, weighted):
    """padded=True: the classes, then -1 with zero rows, B rows in all; the same prototypes and
    inverse, and the same gradient (one huge class included)."""
    x, labels = batch(B, D, dtype, device, num_classes=num_classes, seed=B)
    w = torch.rand(B, device=device) + 0.1 if weighted else None
    xp, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    classes, protos, inverse = protomem.generate_prototypes(xp, labels, w, padded=True)
    rc, rp, ri = generate_prototypes_ref(xr, labels, w)
    U = rc.numel()
    assert classes.shape == (B,) and protos.shape == (B, D)
    assert torch.equal(classes[:U], rc) and (classes[U:] == -1).all()
    assert torch.equal(inverse, ri) and (protos[U:] == 0).all()
    torch.testing.assert_close(protos[:U], rp, atol=STORAGE_ATOL[protos.dtype], rtol=0)
    g = torch.randn(B, D, device=device, dtype=protos.dtype)
    (protos * g).sum().backward()
    (rp * g[:U]).sum().backward()
    torch.testing.assert_close(xp.grad, xr.grad, atol=STORAGE_ATOL[protos.dtype] * 10, rtol=1e-4)


def test_padded_opcheck(device):
    x, labels = batch(11, 7, torch.float32, device)
    torch.library.opcheck(torch.ops.protomem.generate_prototypes.default, (x, labels, None, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
