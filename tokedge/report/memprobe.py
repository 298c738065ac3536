"""Memory of one profile row, measured in a fresh process (`python -m tokedge.report.memprobe`,
a JSON request on stdin): load the artifact, run every image once, print the process's RSS before
loading and its peak RSS as one JSON line. A fresh process per row, so each row's peak is its own
and not the peak of whatever the profiling process ran before it."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    request = json.loads(sys.stdin.read())
    from tokedge.report.machine import peak_rss_mb
    from tokedge.runtime.backends import Backend
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.preprocess import load_image

    b = request["backend"]
    choice = Backend(**{**b, "engines": Path(b["engines"]) if b.get("engines") else None,
                        "cache_dir": Path(b["cache_dir"]) if b.get("cache_dir") else None})
    images = [load_image(p) for p in request["images"]]
    # Linux: reset the high-water mark, so that the peak is that of loading and running, not of an
    # import's passing allocation; elsewhere the peak since the process started
    reset = _reset_peak()
    before = _status_mb("VmRSS") if reset else peak_rss_mb()  # interpreter, libraries and the images
    with Pipeline.load(request["artifact"], backend=choice) as pipe:
        for image in images:
            pipe.generate(image, request["prompt"], max_new_tokens=request["max_new_tokens"], budget=request["budget"])
    peak = _status_mb("VmHWM") if reset else peak_rss_mb()
    print(json.dumps({"rss_before_load_mb": before, "peak_rss_mb": peak, "peak_reset": reset}))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_mb("VmHWM") > 0
    except OSError:
        return False


def _status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    return 0.0


if __name__ == "__main__":
    main()
