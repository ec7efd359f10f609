"""protomem: identity-embedding training over any number of classes with GPU memory that does not
grow with the class count (Prototype Memory, Dynamic Class Queue) on compiled C++/CUDA kernels."""
from ._loader import load_extension
from ._version import __version__

_C = load_extension()

from . import distributed, functional, margins, metrics, models, ops, reference, staleness  # noqa: E402
from .losses import (  # noqa: E402
    DCQLoss,
    FullSoftmaxLoss,
    MomentumEncoder,
    PartialFCLoss,
    PrototypeMemoryLoss,
)
from .margins import ArcFace, CombinedMargin, CosFace  # noqa: E402
from .memory import ClassQueue, PrototypeMemory  # noqa: E402
from .ops import (  # noqa: E402
    generate_prototypes,
    lookup,
    memory_update_,
    queue_enqueue_,
    rebuild_index_,
)


def build_info():
    """What the extension was built with.

    Returns:
        dict with ``version``, ``torch_version`` (the torch it was compiled against), ``with_cuda``
        (bool), ``cuda_version`` and ``cuda_arch_list`` (None without CUDA), ``openmp`` (bool:
        the C++ kernels' ``at::parallel_for`` runs on ATen's threads).
    """
    return dict(_C.build_info())


__all__ = [
    "__version__",
    "build_info",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "DCQLoss",
    "FullSoftmaxLoss",
    "MomentumEncoder",
    "PartialFCLoss",
    "PrototypeMemoryLoss",
    "ClassQueue",
    "PrototypeMemory",
    "generate_prototypes",
    "lookup",
    "memory_update_",
    "queue_enqueue_",
    "rebuild_index_",
    "distributed",
    "functional",
    "margins",
    "metrics",
    "models",
    "ops",
    "reference",
    "staleness",
]
