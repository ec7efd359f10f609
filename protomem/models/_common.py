"""What the encoders share: BatchNorm eps and the embedding ("features") layer."""
from torch import nn

BN_EPS = 1e-5


def feature_layer(in_features, embedding_size):
    """``(fc, features)``: Linear(in_features -> embedding_size) and BatchNorm1d(embedding_size).

    The BatchNorm's scale is fixed at 1 (``requires_grad=False``) and only its shift is learnt, as
    in insightface's backbones (mxnet's ``fix_gamma`` on the embedding BN): in training every
    embedding channel is standardised over the batch, none can grow or fade by a learnt factor.
    """
    fc = nn.Linear(in_features, embedding_size)
    features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
    nn.init.constant_(features.weight, 1.0)
    features.weight.requires_grad_(False)
    return fc, features

