"""Face alignment: the similarity estimate recovers known transforms and is the least-squares one,
the warp equals OpenCV-convention bilinear sampling written per pixel, and aligned landmarks land
within 0.05 px of the ArcFace template."""
import math

import pytest
import torch

from ijb_helpers import apply, random_similarity
from protomem.evaluation.ijb import (
    ARCFACE_TEMPLATE,
    align_face,
    degenerate_landmarks,
    similarity_transform,
    warp_affine,
)


def test_recovers_known_similarity():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        to_crop = random_similarity(gen, scale=(0.3, 4.0), angle=170.0, shift=(-50.0, 200.0))
        landmarks = apply(to_crop, ARCFACE_TEMPLATE)
        m = similarity_transform(landmarks)                 # crop -> template: the inverse
        full = torch.cat([to_crop, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
        torch.testing.assert_close(m, torch.linalg.inv(full)[:2], rtol=0, atol=1e-9)


def test_batched_and_least_squares():
    """On noisy points the estimate is the batch of single estimates, and no nearby similarity
    (perturbed scale, angle, shift) has a smaller squared error."""
    gen = torch.Generator().manual_seed(1)
    src = torch.randn(6, 5, 2, dtype=torch.float64, generator=gen) * 30 + 100
    dst = torch.randn(5, 2, dtype=torch.float64, generator=gen) * 20 + 50
    batch = similarity_transform(src, dst)
    assert batch.shape == (6, 2, 3) and batch.dtype == torch.float64
    for i in range(6):
        torch.testing.assert_close(batch[i], similarity_transform(src[i], dst), rtol=0, atol=1e-12)
        m = batch[i]
        best = (apply(m, src[i]) - dst).pow(2).sum()
        s, a = m[0, 0].hypot(m[1, 0]), torch.atan2(m[1, 0], m[0, 0])
        for ds, da, dt in [(1e-3, 0, 0), (-1e-3, 0, 0), (0, 1e-3, 0), (0, -1e-3, 0), (0, 0, 1e-2)]:
            s2, a2 = s * (1 + ds), a + da
            other = torch.stack([torch.stack([s2 * a2.cos(), -s2 * a2.sin(), m[0, 2] + dt]),
                                 torch.stack([s2 * a2.sin(), s2 * a2.cos(), m[1, 2] - dt])])
            assert (apply(other, src[i]) - dst).pow(2).sum() > best


def bilinear_reference(image, matrix, h, w):
    """cv2.warpAffine(image, matrix, (w, h), INTER_LINEAR, borderValue=0), pixel by pixel."""
    c, hi, wi = image.shape
    inv = torch.linalg.inv(torch.cat([matrix, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]))
    img = image.double()
    out = torch.zeros(c, h, w, dtype=torch.float64)

    def pixel(y, x):
        return img[:, y, x] if 0 <= y < hi and 0 <= x < wi else torch.zeros(c, dtype=torch.float64)

    for y in range(h):
        for x in range(w):
            sx, sy, _ = (inv @ torch.tensor([x, y, 1.0], dtype=torch.float64)).tolist()
            x0, y0 = math.floor(sx), math.floor(sy)
            fx, fy = sx - x0, sy - y0
            out[:, y, x] = ((1 - fy) * ((1 - fx) * pixel(y0, x0) + fx * pixel(y0, x0 + 1))
                            + fy * ((1 - fx) * pixel(y0 + 1, x0) + fx * pixel(y0 + 1, x0 + 1)))
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_warp_equals_per_pixel_bilinear(dtype):
    gen = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, 13, 17), generator=gen).to(dtype)
    # output partly outside the input: the zero border is exercised
    matrix = torch.tensor([[0.8, -0.3, 2.5], [0.35, 0.9, -1.25]], dtype=torch.float64)
    out = warp_affine(image, matrix, size=(15, 19))
    expected = bilinear_reference(image, matrix, 15, 19)
    assert out.dtype == dtype and out.shape == (3, 15, 19)
    if dtype == torch.uint8:
        assert (out.double() - expected.round()).abs().max() <= 1      # rounding of x.5 ties
    else:
        atol = 1e-9 if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    batch = warp_affine(torch.stack([image, image.flip(2)]), torch.stack([matrix, matrix]), (15, 19))
    torch.testing.assert_close(batch[0], out)


def blobs(points, h, w, sigma, to_template=None):
    """Gaussian blobs at the template points, drawn on an h x w crop whose pixel p sits at
    ``to_template(p)`` in template coordinates (identity when None)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    grid = torch.stack([xs, ys], -1)
    if to_template is not None:
        grid = grid @ to_template[:, :2].T + to_template[:, 2]
    d2 = (grid[:, :, None, :] - points).pow(2).sum(-1)
    return torch.exp(-d2 / (2 * sigma ** 2)).sum(-1)


def centroids(image, points, radius=8):
    """Intensity centroid of the image in a window around each point: [K, 2] (x, y)."""
    out = []
    for x, y in points.tolist():
        x0, y0 = round(x), round(y)
        win = image[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
        ys, xs = torch.meshgrid(torch.arange(y0 - radius, y0 + radius + 1, dtype=torch.float64),
                                torch.arange(x0 - radius, x0 + radius + 1, dtype=torch.float64),
                                indexing="ij")
        out.append(torch.stack([(win * xs).sum() / win.sum(), (win * ys).sum() / win.sum()]))
    return torch.stack(out)


def test_aligned_landmarks_within_five_hundredths_of_a_pixel():
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        to_crop = random_similarity(gen, scale=(0.9, 1.8), angle=30.0, shift=(15.0, 40.0))
        full = torch.cat([to_crop, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
        to_template = torch.linalg.inv(full)[:2]
        crop = blobs(ARCFACE_TEMPLATE, 230, 220, sigma=2.0, to_template=to_template) * 200
        landmarks = apply(to_crop, ARCFACE_TEMPLATE)
        aligned = align_face(crop[None].expand(3, -1, -1), landmarks)[0]
        found = centroids(aligned, ARCFACE_TEMPLATE)
        assert (found - ARCFACE_TEMPLATE).norm(dim=1).max() < 0.05
        # and the whole aligned image is the blobs drawn in place (up to bilinear interpolation's
        # error on a 2-pixel Gaussian, a few % of its peak)
        torch.testing.assert_close(aligned, blobs(ARCFACE_TEMPLATE, 112, 112, 2.0) * 200, rtol=0, atol=16.0)


def test_degenerate_landmarks():
    good = ARCFACE_TEMPLATE.clone()
    same = torch.full((5, 2), 40.0, dtype=torch.float64)
    tiny = same + torch.randn(5, 2, dtype=torch.float64) * 1e-3
    nan = good.clone()
    nan[2, 0] = math.nan
    assert degenerate_landmarks(torch.stack([good, same, tiny, nan])).tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="degenerate"):
        align_face(torch.zeros(3, 50, 50, dtype=torch.uint8), same)
    with pytest.raises(ValueError, match="at least 2 x 2"):
        warp_affine(torch.zeros(3, 1, 5), torch.eye(2, 3, dtype=torch.float64))
