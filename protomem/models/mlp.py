"""A small MLP encoder for inputs that are already feature vectors (synthetic identities, tests)."""
from torch import nn

from ._common import BN_EPS, feature_layer

NORMS = ("batch", "layer", "none")


class MLPEncoder(nn.Module):
    """Feature vectors ``x [B, in_dim]`` (float) -> embeddings ``[B, embedding_size]`` (same dtype).

    Each hidden layer is Linear -> norm -> PReLU -> dropout; the output layer is Linear ->
    BatchNorm1d with its scale fixed at 1, the same embedding layer as the face backbones. In
    training mode the BatchNorm layers need B >= 2.

    Args:
        in_dim: input width.
        embedding_size: output width.
        hidden: widths of the hidden layers; ``()`` for a single Linear -> BatchNorm1d.
        dropout: dropout probability after each hidden activation.
        norm: the hidden layers' normalisation, "batch", "layer" or "none".
    """

    def __init__(self, in_dim, embedding_size=512, hidden=(512,), dropout=0.0, norm="batch"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [int(in_dim), *(int(h) for h in hidden)]
        if min(widths) < 1 or int(embedding_size) < 1:
            raise ValueError(f"in_dim, hidden and embedding_size must be positive, got {in_dim}, "
                             f"{tuple(hidden)}, {embedding_size}")
        self.in_dim = widths[0]
        layers = []
        for width_in, width in zip(widths[:-1], widths[1:]):
            # A bias before a normalisation that subtracts the mean would be dead weight.
            layers.append(nn.Linear(width_in, width, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width, eps=BN_EPS))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers += [nn.PReLU(width), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.fc, self.features = feature_layer(widths[-1], int(embedding_size))

    def forward(self, x):
        """``x [B, in_dim]`` float -> embeddings ``[B, embedding_size]``, dtype of the computation."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must be [B, {self.in_dim}], got {list(x.shape)}")
        return self.features(self.fc(self.body(x)))
