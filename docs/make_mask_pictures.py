"""Draws docs/masks/*.png, the pictures next to the layouts in docs/masks.md.

    python docs/make_mask_pictures.py
"""

import math
from pathlib import Path

import segflex
from segflex import SegmentLayout

OUT = Path(__file__).parent / "masks"

LAYOUTS = {
    # Instruction + few-shot examples once, N paraphrases each seeing it, answer over all.
    "self_ensemble": SegmentLayout([40, 12, 15, 11, 14, 12, 3, 8],
                                   ["shared"] + ["isolated"] * 5 + ["global", "global"],
                                   [0] + [-math.log(5)] * 5 + [0, 0]),
    # The earlier system's format: every paraphrase repeats the whole prompt.
    "seed_format": SegmentLayout.seed_format([[0] * 45, [0] * 48, [0] * 44], separator=[0] * 4,
                                             bos=[1], generated=8),
    # Parallel Context Windows / Block-Attention: independent windows, then the task.
    "parallel_context_windows": SegmentLayout([30, 30, 30, 20], ["isolated"] * 3 + ["global"]),
    # Star Attention: the first block is an anchor every later block sees.
    "star_attention_anchor": SegmentLayout([24, 24, 24, 24, 10],
                                           ["shared", "isolated", "isolated", "isolated", "global"]),
    # Plain causal attention: a single shared (or global) segment.
    "causal": SegmentLayout([64], ["global"]),
}

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, layout in LAYOUTS.items():
        segflex.save_png(layout, OUT / f"{name}.png", title=f"{name}: {layout!r}"[:90])
        print(name, layout)
