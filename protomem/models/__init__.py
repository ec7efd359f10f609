"""Encoders that turn inputs into embeddings for the loss heads: IR-ResNet face backbones for
112x112 RGB crops and an MLP for feature vectors. ``build_backbone`` picks one by name."""
from .iresnet import IBasicBlock, IResNet, iresnet18, iresnet34, iresnet50, iresnet100
from .mlp import MLPEncoder

BACKBONES = {
    "mlp": MLPEncoder,
    "iresnet18": iresnet18,
    "iresnet34": iresnet34,
    "iresnet50": iresnet50,
    "iresnet100": iresnet100,
}


def build_backbone(name, embedding_size=512, in_dim=None, **kwargs):
    """The encoder called ``name``, mapping its input to ``[B, embedding_size]`` embeddings.

    Args:
        name: one of ``BACKBONES``: "mlp" (input ``[B, in_dim]``) or "iresnet18/34/50/100"
            (input ``[B, 3, 112, 112]``).
        embedding_size: output width.
        in_dim: input width; required for "mlp", must be None for the image backbones.
        kwargs: passed on (``MLPEncoder``: hidden, dropout, norm; ``IResNet``: dropout,
            zero_init_residual, fp16, autocast_dtype).

    Returns:
        an ``nn.Module`` in training mode, float32 parameters on the CPU.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if name == "mlp":
        if in_dim is None:
            raise ValueError("backbone 'mlp' needs in_dim, the width of its input features")
        return MLPEncoder(in_dim, embedding_size, **kwargs)
    if in_dim is not None:
        raise ValueError(f"in_dim is for 'mlp' only; {name!r} takes [B, 3, 112, 112] images, got in_dim={in_dim}")
    return BACKBONES[name](embedding_size, **kwargs)


__all__ = ["BACKBONES", "IBasicBlock", "IResNet", "MLPEncoder", "build_backbone",
           "iresnet18", "iresnet34", "iresnet50", "iresnet100"]
