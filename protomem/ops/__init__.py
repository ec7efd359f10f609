"""Python faces of the torch.ops.protomem ops: fake (meta) kernels for torch.compile, autograd
registrations, and documented wrappers."""
from .cos_lse import cos_lse_fwd
from .generate_prototypes import generate_prototypes
from .lookalike_update import lookalike_update_
from .lookup import lookup, rebuild_index_
from .memory_update import index_capacity, memory_update_
from .queue_enqueue import queue_enqueue_

__all__ = [
    "cos_lse_fwd",
    "generate_prototypes",
    "index_capacity",
    "lookalike_update_",
    "lookup",
    "memory_update_",
    "queue_enqueue_",
    "rebuild_index_",
]
