"""Every Python block of README.md runs as written.

What the test adds, and why (keep this list short: a block that needs more is a block to fix):
- stand-ins for the user's own objects the blocks name but do not define (``STAND_INS``): an
  encoder, a loader, images, labels and pair flags, embeddings and weights for the fused loss;
- files the blocks read, in a temporary working folder: ``faces_emore/train.rec``, ``lfw.bin``,
  an image folder ``folder/`` (two identities) and a tiny IJB-C release ``IJB_release/IJBC``
  (``tests/ijb_helpers.py``; the blocks' ``/data/`` prefix is dropped);
- ``TEXT_EDITS``: smaller sizes, and the CPU instead of CUDA when the machine has no GPU.
"""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
TEXT_EDITS = [("100_000", "1_000"),            # memory and data set sizes
              ('"/data/', '"'),                 # data sets: in the working folder
              ('"iresnet50"', '"iresnet18"')]  # the same API, a quarter of the work
CPU_EDITS = [(".cuda()", ""), ('"cuda"', '"cpu"'),
             ("autocast_dtype=torch.bfloat16", "autocast_dtype=None")]  # CPU bf16 convolutions crawl


def python_blocks():
    """(first line number, code) of each ```python block of the README."""
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


class TinyEncoder(nn.Module):
    """Stand-in for the user's backbone: [B, 3, H, W] -> [B, 512]."""

    def __init__(self):
        super().__init__()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(4), nn.Linear(3 * 4 * 4, 512)

    def forward(self, img):
        return self.fc(self.pool(img).flatten(1))


def stand_ins():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 3, 112, 112, generator=g) * 2 - 1
    labels = torch.arange(10).repeat_interleave(2)
    B, M, D = 6, 10, 32
    return {
        "MyBackbone": TinyEncoder, "encoder": TinyEncoder(), "model": TinyEncoder(),
        "images": images, "labels": labels, "issame": np.arange(10) % 2 == 0,
        "loader": [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 20, 4)],
        "x": torch.randn(B, D, generator=g), "W": torch.randn(M, D, generator=g),
        "row_labels": torch.arange(B), "col_labels": torch.arange(M),
        "pos_cos": torch.rand(B, generator=g) * 2 - 1,
    }


def _uint8_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The working folder with the files the blocks read (made once for all blocks)."""
    from ijb_helpers import write_ijb_set
    from PIL import Image

    from protomem.data import write_recordio
    from protomem.data.verification import write_verification_bin

    root = tmp_path_factory.mktemp("readme")
    imgs = _uint8_images(4, 0)
    write_recordio(root / "faces_emore" / "train", [(imgs[i], i // 2) for i in range(4)])
    write_verification_bin(root / "lfw.bin", _uint8_images(4, 1), [True, False])
    for i, img in enumerate(_uint8_images(4, 2)):
        (root / "folder" / f"id{i // 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "folder" / f"id{i // 2}" / f"{i}.png")
    write_ijb_set(str(root / "IJB_release" / "IJBC"), "IJBC", identities=3, templates_per_identity=2)
    return root


@pytest.fixture
def user_files(files, monkeypatch):
    monkeypatch.chdir(files)
    return files


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 6


@pytest.mark.parametrize("line, code", python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_python_block_runs(user_files, line, code):
    edits = TEXT_EDITS + (CPU_EDITS if not torch.cuda.is_available() else [])
    for old, new in edits:
        code = code.replace(old, new)
    names = stand_ins()
    if torch.cuda.is_available():  # the blocks put the heads and memories on the GPU: follow them
        names = {k: v.cuda() if isinstance(v, (torch.Tensor, nn.Module)) else v for k, v in names.items()}
        names["loader"] = [(a.cuda(), b.cuda()) for a, b in names["loader"]]
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme", **names})
