"""Real-size geometry smoke run for the families on the spine that have no tiny real checkpoint:
random weights at the published vision geometry (InternVL3: 448-px tiles, patch 14, 1..12 tiles +
thumbnail, InternViT width 1024, Qwen2 width 896; Gemma 3: 896-px SigLIP width 1152, 256 pooled
tokens, Gemma 3 text head_dim 256), two vision and three text layers so that it runs on a laptop;
exports `none` and `fastv@64` with validation against transformers (export fails when the graphs
disagree). Prints each export's parity and wall time.

    python bench/real_geometry.py internvl|gemma3 [OUT_DIR]

Measured on the 2-core Intel Xeon of the development machine (stop 37): InternVL3 none 46 s
(640x480 -> 13 views, 3,328 visual tokens; 1000x1000 -> 2,560), fastv 49 s; Gemma 3 none 40 s,
fastv 38 s; every case within tolerance; `tokedge build --dry-run --profile jetson-orin-nano-8gb`
plans them (InternVL warns that 3,328 tokens exceed that profile's 3,072: use --max-tiles)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tokedge.export.pipeline import ExportConfig, export
from tokedge.export.presets import (
    TinyGemma3Config,
    TinyInternVLConfig,
    build_tiny_gemma3,
    build_tiny_internvl,
)


def main(which: str, root: Path) -> None:
    t = time.perf_counter()
    if which == "internvl":
        cfg = TinyInternVLConfig(image_size=448, patch_size=14, vision_hidden=1024, vision_heads=16, vision_layers=2,
                                 text_hidden=896, text_heads=14, text_kv_heads=2, text_layers=3, max_tiles=12,
                                 init_std=0.02)
        checkpoint = build_tiny_internvl(root / "internvl", cfg, force=True)
    elif which == "gemma3":
        cfg = TinyGemma3Config(image_size=896, patch_size=14, tokens_per_image=256, vision_hidden=1152,
                               vision_heads=16, vision_layers=2, text_hidden=640, text_heads=4, text_kv_heads=1,
                               head_dim=256, text_layers=3, sliding_window=512,
                               layer_types=("sliding_attention", "sliding_attention", "full_attention"), init_std=0.02)
        checkpoint = build_tiny_gemma3(root / "gemma3", cfg, force=True)
    else:
        raise SystemExit("usage: python bench/real_geometry.py internvl|gemma3 [OUT_DIR]")
    print(f"{which}: checkpoint built in {time.perf_counter() - t:.1f} s", flush=True)
    for method, budget in (("none", None), ("fastv", 64)):
        t = time.perf_counter()
        result = export(ExportConfig(model=str(checkpoint), out=root / f"{which}-{method}", method=method,
                                     budget=budget, force=True))
        cases = "; ".join(str(c.get("label")) for c in result.parity["cases"])
        print(f"{which} {method}: parity {'ok' if result.parity['ok'] else 'FAILED'} ({cases}), "
              f"{time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "", Path(sys.argv[2] if len(sys.argv) > 2 else "real-geometry"))
