"""Face alignment to insightface's 112 x 112 ArcFace crop: a least-squares similarity transform from
the 5 detected landmarks to the template, and a bilinear warp.

Written on torch (no OpenCV / scikit-image): the estimate is closed-form and batched, and the warp
is ``grid_sample``, so it runs batched on the CPU or a GPU with no extra dependency. The conventions
are OpenCV's ``warpAffine`` (what insightface uses): pixel centres at integer coordinates, the
matrix maps crop pixels to aligned pixels, samples outside the crop are 0.
"""
import torch
import torch.nn.functional as F

__all__ = ["ARCFACE_TEMPLATE", "align_face", "degenerate_landmarks", "similarity_transform",
           "warp_affine"]

# insightface's ArcFace template for 112 x 112 crops: left eye, right eye, nose tip, left and right
# mouth corners, (x, y) in pixels (the 96 x 112 template of SphereFace shifted 8 px right).
ARCFACE_TEMPLATE = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)
ALIGNED_SIZE = 112


def _points(x, name):
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() < 2 or x.shape[-1] != 2:
        raise ValueError(f"{name} must be [..., K, 2] points, got shape {tuple(x.shape)}")
    return x


def similarity_transform(src, dst=None):
    """The similarity (scale, rotation, translation; no reflection) that maps ``src`` onto ``dst``
    with the least squared error: Umeyama's estimate, here in its closed 2-D form. Writing points as
    complex numbers, ``dst ~ a * src + b`` with ``a = sum(conj(src_c) dst_c) / sum(|src_c|^2)`` over
    the centred points (scale ``|a|``, angle ``arg a``).

    Args:
        src: [..., K, 2] points (K >= 2), e.g. the 5 landmarks of each crop [N, 5, 2].
        dst: [K, 2] or [..., K, 2] target points; default ``ARCFACE_TEMPLATE``.

    Returns:
        float64 [..., 2, 3] matrices ``M`` with ``dst ~ M[:, :2] @ src + M[:, 2]``; non-finite where
        the ``src`` points coincide (see ``degenerate_landmarks``).
    """
    src = _points(src, "src")
    dst = ARCFACE_TEMPLATE if dst is None else _points(dst, "dst")
    zs = torch.complex(src[..., 0], src[..., 1])
    zd = torch.complex(dst[..., 0], dst[..., 1]).to(zs.device)
    cs = zs - zs.mean(-1, keepdim=True)
    cd = zd - zd.mean(-1, keepdim=True)
    a = (cs.conj() * cd).sum(-1) / (cs.abs() ** 2).sum(-1)
    b = zd.mean(-1) - a * zs.mean(-1)
    row0 = torch.stack([a.real, -a.imag, b.real], -1)
    row1 = torch.stack([a.imag, a.real, b.imag], -1)
    return torch.stack([row0, row1], -2)


def degenerate_landmarks(landmarks, min_spread=1.0):
    """Which landmark sets cannot define an alignment: non-finite, or spread (RMS distance from
    their centroid) below ``min_spread`` pixels, where the scale of the transform blows up.

    Args:
        landmarks: [..., K, 2] points.
        min_spread: the smallest acceptable spread in pixels.

    Returns:
        bool [...].
    """
    pts = _points(landmarks, "landmarks")
    spread = (pts - pts.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()
    return ~torch.isfinite(pts).all(-1).all(-1) | ~(spread >= min_spread)


def warp_affine(images, matrices, size=(ALIGNED_SIZE, ALIGNED_SIZE)):
    """Bilinear affine warp with OpenCV's ``warpAffine(src, M, (w, h), borderValue=0)`` semantics:
    output pixel ``p`` takes the input at ``M^-1 p``, pixel centres at integer coordinates.

    Args:
        images: [C, H, W] or [B, C, H, W], uint8 or float (H, W >= 2).
        matrices: [2, 3] or [B, 2, 3], mapping input pixel (x, y) to output pixel (x, y).
        size: (height, width) of the output.

    Returns:
        [(B,) C, size[0], size[1]] of the images' dtype (uint8 rounded and clamped), on their device.
    """
    single = images.dim() == 3
    x = images[None] if single else images
    m = torch.as_tensor(matrices, dtype=torch.float64, device=x.device).reshape(-1, 2, 3)
    if x.dim() != 4 or m.shape[0] != x.shape[0]:
        raise ValueError(f"images [B, C, H, W] and matrices [B, 2, 3] must agree, got "
                         f"{tuple(images.shape)} and {tuple(torch.as_tensor(matrices).shape)}")
    h_in, w_in = x.shape[-2:]
    if h_in < 2 or w_in < 2:
        raise ValueError(f"images must be at least 2 x 2 pixels, got {h_in} x {w_in}")
    h, w = size
    full = torch.cat([m, m.new_tensor([0.0, 0.0, 1.0]).expand(m.shape[0], 1, 3)], 1)
    inv = torch.linalg.inv(full)[:, :2]                                   # output -> input pixels
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=x.device),
                            torch.arange(w, dtype=torch.float64, device=x.device), indexing="ij")
    out_pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)
    src = torch.einsum("bij,pj->bpi", inv, out_pts)                       # [B, h*w, 2] input (x, y)
    scale = src.new_tensor([2.0 / (w_in - 1), 2.0 / (h_in - 1)])
    grid = (src * scale - 1).reshape(-1, h, w, 2)                         # align_corners=True units
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = F.grid_sample(x.to(work), grid.to(work), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    if images.dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    else:
        out = out.to(images.dtype)
    return out[0] if single else out


def align_face(image, landmarks):
    """One crop aligned to the 112 x 112 ArcFace template.

    Args:
        image: [3, H, W] (uint8 or float) crop.
        landmarks: [5, 2] (x, y) of the crop's eyes, nose tip and mouth corners, in its pixels.

    Returns:
        [3, 112, 112] of the image's dtype.
    """
    if bool(degenerate_landmarks(landmarks)):
        raise ValueError(f"landmarks {torch.as_tensor(landmarks).flatten().tolist()} give a "
                         f"degenerate alignment")
    return warp_affine(image, similarity_transform(landmarks))
