"""IR-ResNet face backbones ("improved residual" units of ArcFace, Deng et al., arXiv 1801.07698),
the architecture of insightface's arcface_torch ``iresnet``: 112x112 RGB crops -> embeddings.

Module and parameter names follow insightface's layout (``conv1``, ``layer1.0.bn3``, ``fc``,
``features``, ...), so a state dict of the same architecture maps key for key.
"""
import torch
from torch import nn

from ._common import BN_EPS, feature_layer

INPUT_SIZE = 112
WIDTHS = (64, 128, 256, 512)
DEPTHS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def _conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the
    shortcut (identity, or conv1x1(stride) + BN when the shape changes); no activation after the sum.

    Input ``[B, inplanes, H, W]``, output ``[B, planes, ceil(H/stride), ceil(W/stride)]``, same dtype.
    """

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=BN_EPS),
            )

    def forward(self, x):
        """``[B, inplanes, H, W]`` -> ``[B, planes, H', W']`` (see the class docstring)."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


def _autocast_dtype(fp16, autocast_dtype):
    if fp16:
        if autocast_dtype not in (None, torch.float16):
            raise ValueError(f"fp16=True conflicts with autocast_dtype={autocast_dtype}")
        return torch.float16
    if autocast_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype}")
    return autocast_dtype


class IResNet(nn.Module):
    """IR-ResNet encoder: ``x [B, 3, 112, 112]`` (float, insightface normalises pixels to
    ``(p/255 - 0.5)/0.5``) -> embeddings ``[B, embedding_size]``, not L2-normalised.

    Stem conv3x3(3->64) + BN + PReLU at 112x112; four stages of widths 64, 128, 256, 512 with
    ``layers[i]`` blocks each, every stage starting with stride 2 (112 -> 56 -> 28 -> 14 -> 7); head
    BN2d -> dropout -> flatten [B, 512*7*7] -> Linear -> BatchNorm1d (scale fixed at 1).

    Args:
        layers: blocks per stage, four ints (see ``DEPTHS``).
        embedding_size: output width.
        dropout: dropout probability before the Linear layer.
        zero_init_residual: start every block's last BN at weight 0, so each block begins as its
            shortcut (Goyal et al., arXiv 1706.02677).
        fp16: shorthand for ``autocast_dtype=torch.float16`` (insightface's ``fp16`` switch).
        autocast_dtype: None, ``torch.float16`` or ``torch.bfloat16``. When set, the convolutional
            trunk runs under ``torch.autocast`` of the input's device type and that dtype, and the
            Linear + BatchNorm1d head runs in float32 with autocast off: the output is float32.
            When None the module adds no autocast of its own (an outer autocast context applies)
            and the output has the dtype of its computation (float32 for float32 parameters).
    """

    def __init__(self, layers, embedding_size=512, dropout=0.0, zero_init_residual=False,
                 fp16=False, autocast_dtype=None):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.autocast_dtype = _autocast_dtype(fp16, autocast_dtype)
        self.conv1 = _conv3x3(3, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(WIDTHS[0])
        inplanes = WIDTHS[0]
        for i, (planes, blocks) in enumerate(zip(WIDTHS, layers)):
            stage = [IBasicBlock(inplanes, planes, stride=2)]
            stage += [IBasicBlock(planes, planes) for _ in range(int(blocks) - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        side = INPUT_SIZE // 2 ** len(WIDTHS)
        self.fc, self.features = feature_layer(inplanes * side * side, embedding_size)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # insightface's choice; the BN after every conv makes the scale immaterial.
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def trunk(self, x):
        """Convolutional part: ``[B, 3, 112, 112]`` -> flattened ``[B, 512*7*7]`` (input dtype)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.dropout(self.bn2(x)), 1)

    def forward(self, x):
        """``x [B, 3, 112, 112]`` float -> embeddings ``[B, embedding_size]`` (float32 when
        ``autocast_dtype`` is set; else the dtype of the computation)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"x must be [B, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {list(x.shape)}")
        if self.autocast_dtype is None:
            return self.features(self.fc(self.trunk(x)))
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            h = self.trunk(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(h.float()))


def iresnet18(embedding_size=512, dropout=0.0, **kwargs):
    """IR-ResNet-18 (blocks 2, 2, 2, 2; 24.0M parameters at 512-d). ``kwargs`` go to ``IResNet``."""
    return IResNet(DEPTHS["iresnet18"], embedding_size, dropout, **kwargs)


def iresnet34(embedding_size=512, dropout=0.0, **kwargs):
    """IR-ResNet-34 (blocks 3, 4, 6, 3; 34.1M parameters at 512-d). ``kwargs`` go to ``IResNet``."""
    return IResNet(DEPTHS["iresnet34"], embedding_size, dropout, **kwargs)


def iresnet50(embedding_size=512, dropout=0.0, **kwargs):
    """IR-ResNet-50 (blocks 3, 4, 14, 3; 43.6M parameters at 512-d). ``kwargs`` go to ``IResNet``."""
    return IResNet(DEPTHS["iresnet50"], embedding_size, dropout, **kwargs)


def iresnet100(embedding_size=512, dropout=0.0, **kwargs):
    """IR-ResNet-100 (blocks 3, 13, 30, 3; 65.2M parameters at 512-d). ``kwargs`` go to ``IResNet``."""
    return IResNet(DEPTHS["iresnet100"], embedding_size, dropout, **kwargs)
