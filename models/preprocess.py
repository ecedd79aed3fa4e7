"""The reference's image preprocessing with Pillow (spec section 1), for the PyTorch baseline."""
from __future__ import annotations

import numpy as np
import torch

from . import spec

MODES = ('squash', 'center_crop')


def pil_preprocess(image, mode: str = 'squash') -> torch.Tensor:
    """Path or PIL image -> [1,3,224,224] float32 with CLIP normalisation.

    ``squash``: Resize((224,224)) bicubic (training and web demo); ``center_crop``: shorter side to
    224 then centre crop (test scripts, few-shot references)."""
    from PIL import Image
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {MODES}")
    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert('RGB')
    size = spec.IMAGE_SIZE
    if mode == 'squash':
        img = img.resize((size, size), Image.BICUBIC)
    else:
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(spec.CLIP_MEAN, np.float32)) / np.array(spec.CLIP_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)
