"""Facts about the machine a report was measured on, and its measured dense GEMM peak."""

from __future__ import annotations

import functools
import os
import platform
import time

import numpy as np


def numpy_gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 matmul throughput with numpy's BLAS on this machine."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(np.float32)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or a length-delimited payload (bytes)."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
            v >>= 7
            if not v:
                return bytes(out)

    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def matmul_model() -> bytes:
    """An ONNX model with one fp32 MatMul, c[m, n] = a[m, k] @ b[k, n] (symbolic m, k, n), encoded
    by hand so that measuring the peak needs ONNX Runtime only (profile imports no `onnx`)."""
    def tensor(name: str, dims: tuple[str, str]) -> bytes:
        shape = b"".join(_field(1, _field(2, d.encode())) for d in dims)  # TensorShapeProto.dim.dim_param
        tensor_type = _field(1, 1) + _field(2, shape)  # elem_type FLOAT, shape
        return _field(1, name.encode()) + _field(2, _field(1, tensor_type))  # ValueInfoProto: name, type

    node = _field(1, b"a") + _field(1, b"b") + _field(2, b"c") + _field(4, b"MatMul")
    graph = (_field(1, node) + _field(2, b"gemm_peak") + _field(11, tensor("a", ("m", "k")))
             + _field(11, tensor("b", ("k", "n"))) + _field(12, tensor("c", ("m", "n"))))
    return _field(1, 8) + _field(7, graph) + _field(8, _field(2, 17))  # ir_version 8, graph, opset 17


GEMM_SIZES = (1024, 2048)
PEAK_MEASURE = (f"best fp32 MatMul rate of ONNX Runtime (the engine the stages run on) and numpy's BLAS, square "
                f"sizes {', '.join(map(str, GEMM_SIZES))}")


@functools.lru_cache(maxsize=8)
def gemm_peak_gflops(threads: int = 0, sizes: tuple[int, ...] = GEMM_SIZES, repeats: int = 3) -> float:
    """The dense fp32 GEMM peak a stage's achieved GFLOP/s is compared with: the best rate of ONNX
    Runtime's own MatMul (MLAS, with the profile's intra-op threads) and of numpy's BLAS over
    `sizes`; measured once per process (a sweep profiles many artifacts on one machine). numpy alone at 1024 measured ~25% below MLAS on a 2-core EPYC, which showed a vision
    stage at 108% of "peak"; the engine the stages use is the honest ceiling."""
    best = numpy_gemm_gflops(sizes[0], repeats)
    try:
        import onnxruntime as ort
    except ImportError:
        return best
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(matmul_model(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in sizes:
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
        session.run(None, {"a": a, "b": b})  # warm up
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"a": a, "b": b})
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    import importlib.metadata as md

    versions = {}
    for dist in ("tokedge", "onnxruntime", "numpy", "torch", "transformers"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(mem / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if platform.system() != "Darwin" else rss / 2**20
