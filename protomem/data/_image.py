"""Image decoding / encoding shared by the file-backed datasets (Pillow, else torchvision.io)."""
import io

import numpy as np
import torch

try:
    from PIL import Image
except ImportError:  # decoding falls back to torchvision; encoding needs Pillow
    Image = None


def decode_image(data, size=None):
    """Decodes JPEG/PNG bytes to RGB.

    Args:
        data: the encoded bytes.
        size: optional (H, W); the image is resized (bilinear) when its size differs.
    Returns:
        uint8 tensor [3, H, W].
    """
    if Image is not None:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()
    try:
        from torchvision.io import ImageReadMode, decode_image as tv_decode
    except ImportError as err:
        raise ImportError("decoding images needs Pillow (pip install Pillow) or torchvision") from err
    img = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    if size is not None and tuple(img.shape[1:]) != tuple(size):
        img = torch.nn.functional.interpolate(img[None].float(), size=tuple(size), mode="bilinear",
                                              align_corners=False, antialias=True)
        img = img[0].round().clamp(0, 255).to(torch.uint8)
    return img


def to_float(img):
    """uint8 images [..., 3, H, W] -> float32 in [-1, 1] by insightface's (x / 255 - 0.5) / 0.5."""
    return (img.float() / 255 - 0.5) / 0.5


def encode_image(img, format="png", quality=95):
    """Encodes one RGB image.

    Args:
        img: uint8 array-like [H, W, 3] (channels last, as numpy / Pillow hold images).
        format: "png" (lossless) or "jpg"/"jpeg".
        quality: JPEG quality.
    Returns:
        bytes.
    """
    if Image is None:
        raise ImportError("encoding images needs Pillow: pip install Pillow")
    arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"img must be uint8 [H, W, 3], got {arr.dtype} {arr.shape}")
    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}.get(format.lower())
    if fmt is None:
        raise ValueError(f"format must be 'png' or 'jpg', got {format!r}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()
