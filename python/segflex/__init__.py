"""segflex: attention over sequences cut into segments, in C and CUDA.

    import segflex
    layout = segflex.SegmentLayout([40, 12, 15, 11, 3], ["shared", "isolated", "isolated",
                                                        "isolated", "global"])
    segflex.show(layout)                               # the mask, as text
    out = segflex.attention(q, k, v, [layout])         # fused, block-sparse attention
    bm = segflex.build_block_mask([layout]).to_flex()  # drives torch's flex_attention too
"""

from .layout import KINDS, POSITION_MODES, LayoutTable, SegmentLayout, pack_layouts
from .mask import SegmentBlockMask, build_block_mask, mask_mod, save_png, score_mod, show
from .ops import attention, decode, pack
from . import _C

__version__ = "0.1.0"


def cuda_available() -> bool:
    """Whether this build has its CUDA kernels and a CUDA device can run them."""
    return bool(_C.cuda_available())


_LAZY = ("hf", "generate", "data", "evaluate", "output", "models", "experiment", "cli")


def __getattr__(name: str):
    """``segflex.hf``, ``segflex.generate``, ... load on first use: they need transformers,
    pandas or spaCy, which the kernels and layouts do not."""
    if name in _LAZY:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'segflex' has no attribute {name!r}")


__all__ = [
    "KINDS", "POSITION_MODES", "LayoutTable", "SegmentLayout", "SegmentBlockMask", "attention",
    "build_block_mask", "cuda_available", "decode", "mask_mod", "pack", "pack_layouts",
    "save_png", "score_mod", "show",
]
