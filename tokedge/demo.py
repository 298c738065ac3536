"""`make demo`: the main job on the built-in model, end to end, with the commands a user types.

1. build the built-in tiny-llava checkpoint (random weights, LLaVA-1.5 geometry) if not cached;
2. `tokedge export tiny-llava --method cls-attn --budget 64 --dynamic-budget 16:576`;
3. `tokedge verify` the artifact (hashes + ONNX Runtime vs the recorded transformers reference);
4. `tokedge run` one image and prompt through it;
5. `tokedge profile` it at budgets 576/192/64/16 against transformers, with a Jetson prediction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def command_line(argv: list[str]) -> str:
    """The command as it can be pasted back into a shell (arguments with spaces quoted)."""
    import shlex

    return shlex.join(["tokedge", *argv])


def _step(title: str, argv: list[str]) -> None:
    from tokedge.cli import main

    print(f"\n$ {command_line(argv)}", flush=True)
    rc = main(argv)
    if rc != 0:
        print(f"demo: step '{title}' failed (exit {rc})", file=sys.stderr)
        sys.exit(rc)


def demo_image(path: Path) -> Path:
    """A small synthetic picture (so the demo needs no download)."""
    import numpy as np
    from PIL import Image

    h, w = 360, 480
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 40 + yy // 40) % 2) * 200], axis=-1).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)
    return path


BANNER = ("demo: tiny-llava is a built-in model with RANDOM weights (LLaVA-1.5 geometry, no download): "
          "its answers are gibberish by design; the demo shows the pipeline, its parity checks and timings. "
          "Pass a real checkpoint (e.g. llava-hf/llava-1.5-7b-hf) to `tokedge export` for real answers.")


def banner() -> str:
    """The random-weights banner, wrapped at spaces to the terminal's width (no word split)."""
    from tokedge.cli import fit_lines

    return "\n".join(fit_lines(BANNER))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", type=Path)
    args = parser.parse_args()
    print(banner(), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    artifact = args.out / "tiny-llava-cls-attn-64"
    _step("export", ["export", "tiny-llava", "--method", "cls-attn", "--budget", "64", "--dynamic-budget", "16:576",
                     "--out", str(artifact), "--force"])
    _step("verify", ["verify", str(artifact)])
    image = demo_image(args.out / "demo.png")
    _step("run", ["run", str(artifact), "--image", str(image), "--prompt", "What is shown in this image?",
                  "--max-new-tokens", "12"])
    report = args.out / "profile"
    _step("profile", ["profile", str(artifact), "--image", str(image), "--budgets", "576,192,64,16", "--runs", "3",
                      "--max-new-tokens", "8", "--baseline", "tiny-llava", "--predict", "jetson-orin-nano-8gb",
                      "--out", str(report), "--force"])
    print(f"\ndemo: done; artifact at {artifact}, profiling report at {report}/report.md")


if __name__ == "__main__":
    main()
