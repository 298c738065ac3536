"""The bounds of every symbolic axis an artifact's graphs declare, per device profile: pure data
from the manifest, read by build planning (`build/plan.py` knows no axis name) and `check`.

Who creates an axis bounds it: the layout (`tokedge.layouts`: partitions, visual tokens,
candidates, patches, per-image tokens), the video layout (frames), and, here, the text side the
decoder export creates (batch, sequence, past/total sequence of each in-LLM layer group, the
prefill's image positions) and a runtime budget. Every range is built by `bounded`, so
0 <= min <= opt <= max holds by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokedge.errors import UsageError
from tokedge.layouts import Range, layout_of, video_layout_of

TYPICAL_TEXT_TOKENS = 64  # prompt text beside the image, for the `opt` shapes
TEXT_GRAPHS = ("embed", "decoder", "prefill")  # graphs whose axes the text side declares


def bounded(lo: int, opt: int, hi: int, floor: int = 0) -> Range:
    """(min, opt, max) with floor <= min <= opt <= max."""
    lo = max(floor, int(lo))
    hi = max(lo, int(hi))
    return lo, min(max(int(opt), lo), hi), hi


@dataclass
class AxisBounds:
    """Per graph phase: shape axes, shape-tensor values (the runtime budget), and warnings."""

    shapes: dict[str, Range]
    values: dict[str, Range] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def _removed(layout, keep: int, visual: int) -> int:
    """Image tokens an in-LLM stage keeping `keep` (per image, manifest) removes from a prompt whose
    image gives `visual` tokens."""
    per_image = layout.prefill_budget()
    if per_image is None:
        kept = keep
    elif per_image.keep is not None:
        kept = per_image.per_image(visual)
    else:
        kept = min(keep, visual)
    return max(0, visual - kept)


def axis_bounds(manifest, profile, graph: str, phase: str) -> AxisBounds:
    """Bounds of the axes of `graph` run in `phase` ("default", "prefill" or "decode")."""
    from tokedge.memory import image_bounds

    red = manifest.reduction
    layout = layout_of(manifest)
    image = image_bounds(manifest)
    fewest_visual, opt_visual, most_visual = image.prompt_tokens
    if image.tiled:
        prompt_visual = fewest_visual  # the smallest image must fit; larger ones are checked below
    else:
        prompt_visual = opt_visual = manifest.prompt.visual_tokens
    if profile.max_prompt_tokens <= prompt_visual:
        raise UsageError(f"profile {profile.name} allows {profile.max_prompt_tokens} prompt tokens, fewer than the "
                         f"artifact's {prompt_visual} visual tokens plus text")
    if red.budget_range:  # the fewest visual tokens a prompt can carry
        prompt_visual = max(red.budget_range[0], profile.budget_min)
    video = video_layout_of(manifest)
    if video is not None:  # a video prompt may be shorter than any image's
        prompt_visual = min(prompt_visual, video.fewest_tokens())
    max_total = min(profile.max_sequence, manifest.model.max_position_embeddings)
    max_prompt = min(profile.max_prompt_tokens, max_total - 1)  # leave room for at least one new token
    if max_prompt <= prompt_visual:
        raise UsageError(f"profile {profile.name} leaves {max_prompt} prompt tokens, not more than the "
                         f"artifact's {prompt_visual} visual tokens")
    out = AxisBounds(shapes={"batch": (1, 1, profile.max_batch)})
    limit = layout.pixel_limit()
    if limit is not None and most_visual >= max_prompt:  # the fix is the artifact's pixel budget
        fits = layout.pixels_for_tokens(max_prompt - 1 - TYPICAL_TEXT_TOKENS)
        raise UsageError(f"profile {profile.name} holds {max_prompt} prompt tokens but this artifact's largest image "
                         f"(--max-pixels {limit}) gives {most_visual} visual tokens; re-export with --max-pixels "
                         f"{fits} or less for this profile")
    if image.tiled and most_visual >= max_prompt:
        out.warnings.append(
            f"profile {profile.name} allows {max_prompt} prompt tokens but the layout's largest image gives "
            f"{most_visual} visual tokens: images over {max_prompt - 1} visual tokens will not run on these "
            "engines (use a profile with a larger max_prompt_tokens, or a reduced artifact)")
    opt_prompt = min(max_prompt, opt_visual + TYPICAL_TEXT_TOKENS)
    if graph in TEXT_GRAPHS:
        out.shapes.update(_text_axes(manifest, layout, image, phase, prompt_visual, opt_prompt, max_prompt, max_total))
    else:  # a vision-side graph: the layout's axes, and the video layout's
        out.shapes.update(layout.axes(max_prompt))
        if video is not None:
            out.shapes.update(video.axes())
    if red.budget_range:
        lo = max(red.budget_range[0], profile.budget_min)
        hi = min(red.budget_range[1], profile.budget_max)
        if lo > hi:
            raise UsageError(f"the artifact's budget range {red.budget_range[0]}..{red.budget_range[1]} and profile "
                             f"{profile.name}'s {profile.budget_min}..{profile.budget_max} do not overlap")
        budget = bounded(lo, red.budget, hi, floor=1)
        out.shapes["visual_tokens"] = budget
        out.values["budget"] = budget
    return out


def _text_axes(manifest, layout, image, phase: str, prompt_visual: int, opt_prompt: int, max_prompt: int,
               max_total: int) -> dict[str, Range]:
    red = manifest.reduction
    shapes: dict[str, Range] = {}
    if phase == "decode":
        shapes["sequence"] = (1, 1, 1)
    elif phase == "prefill":
        shapes["sequence"] = bounded(prompt_visual + 1, opt_prompt, max_prompt, floor=1)
    else:  # embed: prompts and single decode tokens
        shapes["sequence"] = bounded(1, opt_prompt, max_prompt, floor=1)
    lo_v, opt_v, _ = image.vision_tokens
    typical = min(opt_v, max(1, opt_prompt - TYPICAL_TEXT_TOKENS))  # the typical image, as much as fits
    groups = [(0, 0, 0, 0)]  # (group, removed at the fewest, typical and most visual tokens)
    for g, stage in enumerate(red.stages, start=1):
        keep = int(stage["keep"])
        # a video's in-LLM stages scale their keep to the video (VideoPlan.llm_keep): remove possibly nothing
        fewest = 0 if manifest.video is not None else _removed(layout, keep, lo_v)
        groups.append((g, fewest, _removed(layout, keep, typical),
                       _removed(layout, keep, max_prompt - 1)))
    for g, fewest, typical, most in groups:
        suffix = "" if g == 0 else f".{g}"
        if phase == "decode":
            # the cache holds the group's prompt + generated tokens; pruning removes at least `fewest`
            shapes["past_sequence" + suffix] = bounded(1, opt_prompt - typical, max_total - 1 - fewest, floor=1)
            shapes["total_sequence" + suffix] = bounded(2, opt_prompt - typical + 1, max_total - fewest, floor=2)
        else:
            lo, opt, hi = shapes["sequence"]
            shapes["past_sequence" + suffix] = (0, 0, 0)
            shapes["total_sequence" + suffix] = (lo, opt, hi)
            shapes["sequence" + suffix] = bounded(lo - most, opt - typical, hi - fewest, floor=1)
    if red.stages:  # the prefill's image positions: every image token of a prompt, one image or several
        lo, opt, hi = image.vision_tokens
        shapes["image_tokens"] = bounded(min(lo, prompt_visual), opt, max_prompt - 1, floor=1)
    return shapes


__all__ = ["TEXT_GRAPHS", "TYPICAL_TEXT_TOKENS", "AxisBounds", "axis_bounds", "bounded"]
