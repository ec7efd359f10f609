"""Embedding inputs with a model: batched, without gradient, in eval mode, with insightface's
flip test for images."""
import torch
from torch import nn

from ._checks import _positive_int

__all__ = ["embed", "flip_embeddings"]


# --------------------------------------------------------------------------------------------------
# images


def _module_device(model):
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def flip_embeddings(model, images, batch_size=256, device=None, flip=True):
    """Embed images in batches, with insightface's flip test.

    Runs under ``torch.no_grad()`` with every submodule in eval mode; each submodule's own training
    flag is restored afterwards (also on error). With ``flip=True`` an image's embedding is
    ``model(x) + model(x flipped left-right)`` (the width axis, dim 3), summed in float32 before any
    normalisation, as insightface's verification does. Images are passed to the model as they are
    (only moved to ``device``): preprocessing is the caller's.

    Args:
        model: ``torch.nn.Module`` mapping [B, 3, H, W] to [B, E].
        images: [N, C, H, W] tensor (any dtype the model accepts), on any device.
        batch_size: images per forward pass.
        device: where the model runs; default the device of its first parameter/buffer (CPU if none).
        flip: add the embedding of the horizontally flipped image.

    Returns:
        [N, E] float32 tensor on the CPU (not normalised).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("images must be a non-empty 4-D tensor [N, C, H, W]")
    _positive_int(batch_size, "batch_size")
    device = _module_device(model) if device is None else torch.device(device)
    modes = [(m, m.training) for m in model.modules()]
    out = []
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                x = images[start:start + batch_size].to(device)
                e = model(x)
                if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != x.shape[0]:
                    raise ValueError(f"model must return a [B, E] tensor, got "
                                     f"{getattr(e, 'shape', type(e).__name__)}")
                e = e.float()
                if flip:
                    e = e + model(torch.flip(x, dims=[3])).float()
                out.append(e.cpu())
    finally:
        for m, training in modes:
            m.training = training
    return torch.cat(out)


class _Reshaped(nn.Module):
    """Presents inputs of any sample shape to ``flip_embeddings`` (which takes [N, C, H, W]) as
    [N, 1, 1, F] and gives the model its own shape back, so one batching loop with its eval-mode
    and device handling serves images and feature vectors alike."""

    def __init__(self, model, sample_shape):
        super().__init__()
        self.model, self.sample_shape = model, tuple(sample_shape)

    def forward(self, x):
        return self.model(x.reshape(x.shape[0], *self.sample_shape))


def embed(model, inputs, batch_size=1024, device=None, flip=False):
    """Embeddings of ``inputs``, computed in batches in eval mode under ``torch.no_grad()``.

    Every submodule's training flag is restored afterwards (also on error).

    Args:
        model: ``nn.Module`` mapping [B, *S] inputs to [B, E] embeddings.
        inputs: [N, *S] tensor (float32 feature vectors [N, F], images [N, 3, H, W], ...), N >= 1.
        batch_size: inputs per forward pass.
        device: where the model runs; default the device of its first parameter (CPU if none).
            The model is not moved: pass the device it lives on.
        flip: insightface's flip test, ``model(x) + model(x flipped left-right)``; images only.

    Returns:
        float32 tensor [N, E] on the CPU (not normalised).
    """
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty tensor [N, ...], got "
                         f"{getattr(inputs, 'shape', type(inputs).__name__)}")
    if inputs.dim() == 4:
        return flip_embeddings(model, inputs, batch_size, device, flip)
    if flip:
        raise ValueError(f"flip needs images [N, C, H, W], got inputs of shape {tuple(inputs.shape)}")
    flat = inputs.reshape(inputs.shape[0], 1, 1, -1)
    return flip_embeddings(_Reshaped(model, inputs.shape[1:]), flat, batch_size, device, False)
