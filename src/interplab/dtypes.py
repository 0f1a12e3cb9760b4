"""The torch dtypes behind the names configs use (`interplab.config.DTYPE_NAMES`)."""

import torch

from interplab.config import DTYPE_NAMES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}
"""float32, float16 and bfloat16 by name."""
