"""Python API mirroring `tokedge run`: `Pipeline.load(artifact).generate(image, prompt, ...)`."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image

from tokedge.artifact import Manifest, open_artifact
from tokedge.errors import InputError, UsageError
from tokedge.layouts import layout_of
from tokedge.runtime.deadline import Deadline
from tokedge.runtime.generate import Generation, SamplingConfig, Timings, generate
from tokedge.runtime.graphs import ArtifactGraphs
from tokedge.runtime.backends import BACKENDS, Backend
from tokedge.runtime.ort_backend import OrtOptions
from tokedge.runtime.preprocess import load_image
from tokedge.runtime.prompt import PromptEncoder

__all__ = ["BACKENDS", "Backend", "Pipeline", "Result"]


@dataclass
class Result:
    texts: list[str]
    token_ids: list[list[int]]
    visual_tokens: int
    timings: Timings

    @property
    def text(self) -> str:
        return self.texts[0]

    def to_dict(self) -> dict:
        single = len(self.texts) == 1
        return {
            "text": self.texts[0] if single else self.texts,
            "token_ids": self.token_ids[0] if single else self.token_ids,
            "visual_tokens": self.visual_tokens,
            "timings": self.timings.to_dict(),
        }


class Pipeline:
    """An artifact opened for generation. Checks format version and every file's sha256 first."""

    def __init__(self, root: Path, manifest: Manifest, graphs: ArtifactGraphs, encoder: PromptEncoder,
                 manifest_sha256: str = ""):
        self.root, self.manifest, self.graphs, self.encoder = root, manifest, graphs, encoder
        self.manifest_sha256 = manifest_sha256  # of the manifest bytes loaded: the artifact's id (as `build` records it)

    @classmethod
    def load(cls, artifact: Path | str, backend: str | Backend = "onnxruntime", options: OrtOptions | None = None,
             engines: Path | str | None = None) -> Pipeline:
        """`backend`: a name (with `engines` for "tensorrt") or a full `Backend` choice; `options`
        tunes the ONNX Runtime sessions (threads...), the backend picks their providers."""
        choice = backend if isinstance(backend, Backend) else Backend(
            name=backend, engines=Path(engines) if engines is not None else None,
            threads=options.intra_op_threads if options is not None else 0)
        choice.check()  # before any file is read: unknown name, missing provider or engines
        root = Path(artifact)
        # manifest schema, format version, every file read once, bounded, confined and hashed; the
        # graphs and the tokenizer are built from those bytes, never re-read from disk
        verified = open_artifact(root)
        manifest = verified.manifest
        encoder = PromptEncoder(root, manifest.prompt, manifest.model.pad_token_id, manifest.prompt.special_tokens,
                                tokenizer_json=verified.read(manifest.prompt.tokenizer_file))
        runners = _tensorrt_runners(root, choice.engines, verified.manifest_sha256) if choice.name == "tensorrt" else None
        chosen = choice.ort_options(manifest, root)
        if options is not None:
            chosen = dataclasses.replace(options, backend=chosen.backend, gpu=chosen.gpu)
        graphs = ArtifactGraphs(root, manifest, runners=runners, options=chosen, verified=verified)
        sha = verified.manifest_sha256
        del verified  # the runners hold what they need until their sessions are created
        graphs.__enter__()
        return cls(root, manifest, graphs, encoder, sha)

    def close(self) -> None:
        self.graphs.__exit__(None, None, None)

    def providers(self) -> dict[str, list[str]]:
        """Per graph, the execution providers its session runs on (ONNX Runtime), or its engine."""
        out = {}
        for name, runner in self.graphs.runners.items():
            session = getattr(runner, "session", None)
            out[name] = list(session.get_providers()) if session is not None and hasattr(session, "get_providers") \
                else [type(runner).__name__]
        return out

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def visual_tokens_for(self, budget: int | None) -> int:
        red = self.manifest.reduction
        if budget is None:
            return self.manifest.prompt.visual_tokens
        if red.budget_range is None:
            if budget != red.budget:
                raise InputError(_fixed_budget_message(self.manifest, budget))
            return budget
        lo, hi = red.budget_range
        if not lo <= budget <= hi:
            raise InputError(f"--budget {budget} is outside this artifact's runtime range {lo}..{hi}")
        return budget

    def generate(
        self,
        images: ImagesArg,
        prompts: Sequence[str] | str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        budget: int | None = None,
        on_text: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> Result:
        """Generate for prompts with their images. One prompt (a string): `images` is its image or
        the list of its images. A list of prompts (a batch): `images` has one entry per prompt,
        an image or the list of that prompt's images. `on_text` receives new text as it is
        produced (batch 1); `timeout` (seconds) stops the whole generation with a RunTimeout."""
        started = time.perf_counter()
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise InputError(f"--timeout must be a positive number of seconds (got {timeout})")
        deadline = Deadline(timeout) if timeout is not None else None
        try:
            return self._generate(images, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, budget=budget, on_text=on_text,
                                  started=started, deadline=deadline)
        finally:
            if deadline is not None:
                deadline.close()

    def _generate(self, images, prompts, *, max_new_tokens, temperature, top_k, top_p, seed, budget, on_text,
                  started, deadline) -> Result:
        groups, prompts = group_images(images, prompts)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        cfg.check()
        timings = Timings()
        t0 = time.perf_counter()
        pil = [[img if isinstance(img, Image.Image) else load_image(img) for img in group] for group in groups]
        batch = layout_of(self.manifest).prepare(pil, budget, self.visual_tokens_for)
        counts = batch.counts
        enc = self.encoder.encode(prompts, counts)
        timings.preprocess_ms = (time.perf_counter() - t0) * 1e3
        streamer = _Streamer(self.encoder, on_text) if on_text is not None and len(prompts) == 1 else None
        gen: Generation = generate(self.graphs, batch, enc.input_ids, enc.attention_mask, cfg,
                                   on_step=streamer, timings=timings, started=started, deadline=deadline)
        if streamer is not None:
            streamer.flush(gen.token_ids[0])
        texts = [self.encoder.decode(ids) for ids in gen.token_ids]
        return Result(texts=texts, token_ids=gen.token_ids, visual_tokens=gen.visual_tokens, timings=gen.timings)


    def generate_video(
        self,
        video: Path | str | Sequence[Path | str],
        prompt: str,
        *,
        frames: int | None = None,
        fps: float | None = None,
        budget: int | None = None,
        keep: float | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_text: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ):
        """Generate for one prompt about one video: a clip file, a directory of frames, or a list
        of frame image files in time order. `frames` / `fps` pick the frames (neither: the
        artifact's default count); `budget` (frame tokens reaching the LLM) or `keep` (a share of
        them) sets the per-video budget of a reducing artifact. -> `VideoResult`."""
        from tokedge.runtime.video_pipeline import (
            VideoResult,
            generate_video,
            video_inputs,
            video_plan,
            video_record,
        )

        started = time.perf_counter()
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise InputError(f"--timeout must be a positive number of seconds (got {timeout})")
        info = video_record(self.manifest)
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        cfg.check()
        timings = Timings()
        t0 = time.perf_counter()
        inputs = video_inputs(self.manifest, video, frames, fps)
        plan = video_plan(self.manifest, inputs.frames, budget, keep, inputs=inputs)
        enc = self.encoder.encode_video(prompt, info.video_token, info.video_token_id, plan.placeholders)
        timings.preprocess_ms = (time.perf_counter() - t0) * 1e3
        streamer = _Streamer(self.encoder, on_text) if on_text is not None else None
        deadline = Deadline(timeout) if timeout is not None else None
        try:
            gen = generate_video(self.graphs, inputs, plan, enc.input_ids, enc.attention_mask, cfg, on_step=streamer,
                                 timings=timings, started=started, deadline=deadline)
        finally:
            if deadline is not None:
                deadline.close()
        if streamer is not None:
            streamer.flush(gen.token_ids[0])
        return VideoResult(text=self.encoder.decode(gen.token_ids[0]), token_ids=gen.token_ids[0], frames=inputs.frames,
                           frame_indices=inputs.indices.tolist(), visual_tokens=gen.visual_tokens, budget=plan.keep,
                           kept_per_frame=gen.kept_per_frame, timings=gen.timings, reduce_ms=gen.reduce_ms)


def _fixed_budget_message(manifest, budget: int) -> str:
    """Why `--budget` cannot be chosen at run time for this artifact, in its own terms: a keep
    ratio, every token of each image, a count per image, or one fixed count."""
    from tokedge.layouts import layout_of

    red = manifest.reduction
    how = ("re-export with --dynamic-budget to choose it at run time" if red.supports_runtime_budget else
           f"--method {red.method} takes no runtime budget: export one artifact per budget")
    if red.keep is not None:
        return (f"--budget {budget} does not apply: this artifact keeps a share of each image's visual tokens "
                f"(exported with --keep {red.keep:g}: ceil({red.keep:g} x n) of an image's n, up to {red.budget}); "
                "re-export with another --keep (or --budget N per image) to change it")
    if layout_of(manifest).counts_per_image and red.budget >= red.full_tokens:
        return (f"--budget {budget} does not apply: this artifact keeps every visual token of each image (as many as "
                f"the image's size gives, up to {red.budget}); export with a reduction method (`tokedge methods`) "
                "to keep fewer")
    if layout_of(manifest).counts_per_image:
        return f"--budget {budget} does not apply: this artifact keeps up to {red.budget} visual tokens per image; {how}"
    return f"--budget {budget} does not apply: this artifact has a fixed budget of {red.budget} visual tokens; {how}"


ImageLike = Union[Image.Image, str, Path]
ImagesArg = Union[ImageLike, Sequence[ImageLike | Sequence[ImageLike]]]


def group_images(images: ImagesArg, prompts: Sequence[str] | str) -> tuple[list[list[ImageLike]], list[str]]:
    """`Pipeline.generate`'s images and prompts -> (the images of each prompt, the prompts)."""
    if isinstance(prompts, str):
        groups = [list(images) if isinstance(images, (list, tuple)) else [images]]
        prompts = [prompts]
    else:
        prompts = list(prompts)
        entries = list(images) if isinstance(images, (list, tuple)) else [images]
        if len(entries) != len(prompts):
            raise InputError(f"{len(entries)} image entries for {len(prompts)} prompts; pass one entry per prompt "
                             "(an image, or the list of that prompt's images)")
        groups = [list(e) if isinstance(e, (list, tuple)) else [e] for e in entries]
    if not prompts or any(not group for group in groups):
        raise InputError("every prompt needs at least one image; pass --image for each prompt")
    return groups, prompts


def images_for_prompts(images: list, prompts: list[str], images_per_prompt: str | None = None) -> list[list]:
    """How `tokedge run`'s repeated --image / --prompt flags group: one --prompt takes every image;
    as many --prompt as --image are pairs (a batch, one image each); otherwise --images-per-prompt
    "2,1" says how many consecutive images each prompt takes. -> the images of each prompt."""
    if images_per_prompt is not None:
        try:
            counts = [int(v) for v in images_per_prompt.split(",")]
        except ValueError:
            raise UsageError(f"--images-per-prompt '{images_per_prompt}' is not comma-separated counts "
                             "(for example 2,1)") from None
        if len(counts) != len(prompts):
            raise UsageError(f"--images-per-prompt has {len(counts)} entries for {len(prompts)} --prompt; "
                             "give one count per prompt")
        if min(counts) < 1:
            raise UsageError("--images-per-prompt: every prompt takes at least 1 image")
        if sum(counts) != len(images):
            raise UsageError(f"--images-per-prompt adds up to {sum(counts)} images but {len(images)} --image were "
                             "given; make them agree")
    elif len(prompts) == 1:
        counts = [len(images)]
    elif len(images) == len(prompts):
        counts = [1] * len(prompts)
    else:
        raise UsageError(f"{len(images)} --image for {len(prompts)} --prompt: pass one --prompt for several images "
                         "(one prompt), one --prompt per --image (pairs), or --images-per-prompt (e.g. 2,1) to group them")
    groups, start = [], 0
    for count in counts:
        groups.append(list(images[start:start + count]))
        start += count
    return groups


def _tensorrt_runners(root: Path, engines: Path | str | None, manifest_sha256: str):
    """TensorRT runners for an artifact's engines, refusing engines built from another artifact."""
    import json

    from tokedge.errors import ArtifactError

    if engines is None:
        raise UsageError("--backend tensorrt needs --engines DIR (the output of `tokedge build`)")
    engines = Path(engines)
    from tokedge.safeio import DEFAULT_LIMITS, read_regular_path

    index_path = engines / "engines.json"
    if not os.path.lexists(index_path):
        raise ArtifactError(f"'{engines}' has no engines.json; build engines with `tokedge build`")
    # bounded on the open descriptor before a byte is read, no links followed (like the manifest)
    raw = read_regular_path(engines, "engines.json", DEFAULT_LIMITS.engines_index_bytes, f"'{index_path}'")
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ArtifactError(f"'{index_path}' is not valid JSON; rebuild the engines with `tokedge build`") from None
    if not isinstance(index, dict):
        raise ArtifactError(f"'{index_path}' is not an engines index; rebuild the engines with `tokedge build`")
    if index.get("artifact_manifest_sha256") != manifest_sha256:
        raise ArtifactError(f"the engines in '{engines}' were built from a different artifact; rebuild them with "
                            f"`tokedge build {root} --profile {index.get('profile', 'PROFILE')}`")
    from tokedge.build.trt import open_engines

    return open_engines(engines, index)


class _Streamer:
    """Emits the text delta of row 0 after each step, holding back incomplete UTF-8 sequences."""

    def __init__(self, encoder: PromptEncoder, sink: Callable[[str], None]):
        self.encoder, self.sink, self.sent = encoder, sink, ""

    def __call__(self, rows: list[list[int]]) -> None:
        text = self.encoder.decode(rows[0])
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def flush(self, ids: list[int]) -> None:
        self._emit(self.encoder.decode(ids))

    def _emit(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.sink(text[len(self.sent):])
            self.sent = text
