"""Drop-in loss heads: ``loss = head(embeddings, labels)`` (DCQ: ``head(q, k, labels)``)."""
from .dcq import DCQLoss
from .momentum_encoder import MomentumEncoder
from .partial_fc import FullSoftmaxLoss, PartialFCLoss
from .prototype_memory import PrototypeMemoryLoss

__all__ = ["DCQLoss", "FullSoftmaxLoss", "MomentumEncoder", "PartialFCLoss", "PrototypeMemoryLoss"]
