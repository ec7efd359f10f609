"""Encoders: shapes, dtypes, parameter counts, gradients, determinism, autocast, build_backbone."""
import pytest
import torch
import torch.nn.functional as F

from protomem.models import BACKBONES, IResNet, MLPEncoder, build_backbone, iresnet18
from protomem.models.iresnet import DEPTHS

# Published sizes of insightface's arcface_torch backbones at 512-d, in millions, to 3 figures.
PUBLISHED_MPARAMS = {"iresnet50": 43.6, "iresnet100": 65.2}


def images(batch, seed=0):
    return torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def weighted_sum(y, seed=1):
    # Not y.sum(): through a training-mode BatchNorm the sum of the outputs does not depend on the input.
    return (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))).sum()


def count_from_architecture(layers, emb):
    """Parameters of the architecture as described (BN: weight + bias; PReLU: one per channel)."""
    def block(cin, cout, downsample):
        n = 2 * cin + 9 * cin * cout + 2 * cout + cout + 9 * cout * cout + 2 * cout
        return n + (cin * cout + 2 * cout if downsample else 0)

    total, cin = 3 * 9 * 64 + 2 * 64 + 64, 64
    for width, n in zip((64, 128, 256, 512), layers):
        total += block(cin, width, True) + (n - 1) * block(width, width, False)
        cin = width
    return total + 2 * 512 + (512 * 7 * 7 + 1) * emb + 2 * emb


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def assert_grads_everywhere(model):
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_iresnet_parameter_count(name):
    model = build_backbone(name)
    count = n_params(model)
    assert count == count_from_architecture(DEPTHS[name], 512)
    if name in PUBLISHED_MPARAMS:
        assert abs(count / 1e6 - PUBLISHED_MPARAMS[name]) <= 0.05  # half a unit of the last figure


def test_iresnet_forward_shape_dtype_and_backward():
    torch.manual_seed(0)
    model = iresnet18()
    y = model(images(2))
    assert y.shape == (2, 512) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    weighted_sum(y).backward()
    assert_grads_everywhere(model)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


def test_iresnet_embedding_size_and_dropout():
    model = iresnet18(embedding_size=64, dropout=0.5)
    assert model.fc.out_features == 64 and model.dropout.p == 0.5
    assert n_params(model) == count_from_architecture(DEPTHS["iresnet18"], 64)
    assert model.eval()(images(1)).shape == (1, 64)


def test_iresnet_eval_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = iresnet18().eval()
    x = images(3)
    with torch.no_grad():
        a, b, single = model(x), model(x), model(x[1:2])
    assert torch.equal(a, b)
    # Eval-mode BN uses running statistics: a sample's embedding does not depend on its batch.
    assert F.cosine_similarity(single, a[1:2]).item() > 1 - 1e-5


def test_iresnet_same_seed_same_weights():
    torch.manual_seed(3)
    a = iresnet18().state_dict()
    torch.manual_seed(3)
    b = iresnet18().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_iresnet_state_dict_uses_insightface_names():
    keys = iresnet18().state_dict().keys()
    for key in ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn3.weight",
                "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean",
                "layer4.1.conv2.weight", "bn2.weight", "fc.weight", "fc.bias", "features.bias"):
        assert key in keys, key
    assert "layer1.1.downsample.0.weight" not in keys


def test_zero_init_residual_makes_blocks_identity():
    model = iresnet18(zero_init_residual=True)
    block = model.layer2[1]  # no downsample: the shortcut is the identity
    x = torch.randn(2, 128, 5, 5)
    assert torch.equal(block(x), x)
    assert not any(m.weight.any() for m in (model.layer1[0].bn3, model.layer4[1].bn3))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_iresnet_bfloat16_autocast_returns_float32(train):
    torch.manual_seed(0)
    ref = iresnet18()
    model = iresnet18(autocast_dtype=torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    model.train(train), ref.train(train)
    x = images(2)
    y, y_ref = model(x), ref(x)
    assert y.dtype == torch.float32 and y.shape == (2, 512)
    assert torch.isfinite(y).all()
    # bfloat16 keeps 8 bits of mantissa: close in direction, not bit-equal.
    assert F.cosine_similarity(y, y_ref).min().item() > 0.99
    assert not torch.equal(y, y_ref)
    if train:
        weighted_sum(y).backward()
        assert_grads_everywhere(model)
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_outer_autocast_applies_without_autocast_dtype():
    model = iresnet18().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images(1)).dtype == torch.bfloat16


def test_iresnet_options_and_input_validation():
    assert iresnet18(fp16=True).autocast_dtype == torch.float16
    assert iresnet18().autocast_dtype is None
    with pytest.raises(ValueError, match="fp16"):
        iresnet18(fp16=True, autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="autocast_dtype"):
        iresnet18(autocast_dtype=torch.float64)
    with pytest.raises(ValueError, match="layers"):
        IResNet((2, 2, 2))
    with pytest.raises(ValueError, match="dropout"):
        iresnet18(dropout=1.0)
    with pytest.raises(ValueError, match=r"\[B, 3, 112, 112\]"):
        iresnet18()(torch.randn(2, 3, 96, 96))


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("hidden", [(), (64,), (64, 32)], ids=["linear", "1hidden", "2hidden"])
def test_mlp_forward_backward(norm, hidden):
    torch.manual_seed(0)
    model = MLPEncoder(20, embedding_size=16, hidden=hidden, dropout=0.1, norm=norm)
    x = torch.randn(8, 20)
    y = model(x)
    assert y.shape == (8, 16) and y.dtype == torch.float32
    weighted_sum(y).backward()
    assert_grads_everywhere(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.allclose(model(x[:1]), model(x)[:1], atol=1e-5)


def test_mlp_parameter_count_and_float64():
    model = MLPEncoder(10, embedding_size=6, hidden=(7,), norm="batch")
    # Linear without bias + BN + PReLU, then Linear with bias + BN.
    assert n_params(model) == 10 * 7 + 2 * 7 + 7 + (7 * 6 + 6) + 2 * 6
    model = model.double()
    assert model(torch.randn(4, 10, dtype=torch.float64)).dtype == torch.float64


def test_mlp_validation():
    with pytest.raises(ValueError, match="norm"):
        MLPEncoder(8, norm="group")
    with pytest.raises(ValueError, match="positive"):
        MLPEncoder(0)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        MLPEncoder(8)(torch.randn(4, 9))


def test_build_backbone():
    assert set(BACKBONES) == {"mlp", "iresnet18", "iresnet34", "iresnet50", "iresnet100"}
    mlp = build_backbone("mlp", embedding_size=32, in_dim=12, hidden=(16,), norm="layer")
    assert isinstance(mlp, MLPEncoder) and mlp(torch.randn(3, 12)).shape == (3, 32)
    net = build_backbone("iresnet18", embedding_size=128, dropout=0.2, zero_init_residual=True)
    assert isinstance(net, IResNet) and net.fc.out_features == 128 and net.dropout.p == 0.2
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'") as err:
        build_backbone("resnet50")
    assert all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(ValueError, match="in_dim"):
        build_backbone("mlp")
    with pytest.raises(ValueError, match="in_dim"):
        build_backbone("iresnet18", in_dim=3)


def test_mlp_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = MLPEncoder(128, embedding_size=64, hidden=(96,))
    compiled = torch.compile(model)
    x = torch.randn(32, 128)
    y_eager = model(x)
    weighted_sum(y_eager).backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    y = compiled(x)
    weighted_sum(y).backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-4)
