"""Example inputs and transformers-side reference outputs recorded at export (reference.npz)."""

from __future__ import annotations

import numpy as np
import torch

from tokedge.export.families import LoadedCheckpoint
from tokedge.layouts.tiled import ANYRES_SIZES  # export's tiled canvases (profile reads them without torch)
from tokedge.reduce.base import Method

EXAMPLE_PROMPTS = ("What is shown in this image?", "Describe the picture in detail, please.")


def example_images(n: int = 2):
    """Deterministic synthetic RGB images of different sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(1234)
    sizes = [(300, 200), (224, 400), (336, 336)]
    images = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
        noise = rng.integers(0, 55, size=(h, w, 3))
        images.append(Image.fromarray((base + noise).astype(np.uint8), "RGB"))
    return images




def anyres_example_images():
    """Deterministic synthetic RGB images for tiled layouts (different sizes, so different grids)."""
    from PIL import Image

    rng = np.random.default_rng(4321)
    images = []
    for h, w in ANYRES_SIZES:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx * yy) / (w * h)], axis=-1) * 200
        images.append(Image.fromarray((base + rng.integers(0, 55, size=(h, w, 3))).astype(np.uint8), "RGB"))
    return images


def render_prompt(loaded: LoadedCheckpoint, question: str) -> str:
    return loaded.family.render_prompt(loaded, question)


def tokenize(loaded: LoadedCheckpoint, prompts: list[str], visual_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand each image placeholder to `visual_tokens` copies and tokenize, left-padded."""
    return loaded.family.tokenize(loaded, prompts, visual_tokens)


def pixel_values_for(loaded: LoadedCheckpoint, images) -> np.ndarray:
    return loaded.family.pixel_values(loaded, images)


@torch.no_grad()
def reference_case(llava: LoadedCheckpoint, method: Method, pixel_values: np.ndarray, prompts: list[str], budget: int,
                   steps: int, options: dict | None = None) -> dict[str, np.ndarray]:
    input_ids, attention_mask = tokenize(llava, prompts, budget)
    return reference_from_ids(llava, method, pixel_values, input_ids, attention_mask, budget, steps, options)


@torch.no_grad()
def reference_from_ids(llava: LoadedCheckpoint, method: Method, pixel_values: np.ndarray, input_ids: np.ndarray,
                       attention_mask: np.ndarray, budget: int, steps: int,
                       options: dict | None = None) -> dict[str, np.ndarray]:
    """transformers' outputs for already-tokenized inputs (placeholders expanded to `budget`)."""
    extra = {}
    if method.takes_instruction:  # methods scoring with the prompt's text get it from transformers' embeddings
        extra["instruction"] = instruction_reference(llava, input_ids, attention_mask)
    feats = llava.family.reference_features(llava, method, torch.from_numpy(pixel_values), budget, options, **extra)
    return _logits_case(llava, feats, input_ids, attention_mask, budget, steps)


@torch.no_grad()
def instruction_reference(llava: LoadedCheckpoint, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
    """[b, hidden]: per row, the mean of transformers' input embeddings over the prompt's text tokens
    (attention mask 1, not the image placeholder): Signal.INSTRUCTION (docs/artifact.md)."""
    ids = torch.from_numpy(input_ids)
    text = (torch.from_numpy(attention_mask) == 1) & (ids != llava.family.image_token_id(llava))
    emb = llava.model.get_input_embeddings()(ids).float()
    return (emb * text[..., None]).sum(dim=1) / text.sum(dim=1, keepdim=True).clamp_min(1)


@torch.no_grad()
def _logits_case(llava: LoadedCheckpoint, feats: torch.Tensor, input_ids: np.ndarray, attention_mask: np.ndarray,
                 budget: int, steps: int, images: list | None = None) -> dict[str, np.ndarray]:
    """A reference case from transformers' (reduced) image features: its LM's prefill logits and
    greedy steps on the spliced prompt (`images`: the prompt's images, for families whose
    positions depend on them)."""
    extra = {} if images is None else {"images": images}
    prefill, tokens, step_logits = llava.family.reference_logits(
        llava, torch.from_numpy(input_ids), torch.from_numpy(attention_mask), feats, steps, **extra
    )
    return {
        "budget": np.array(budget, dtype=np.int64),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_embeds": feats.float().numpy(),
        "prefill_logits": prefill.numpy(),
        "step_logits": torch.stack(step_logits, dim=1).numpy(),
        "tokens": tokens.numpy(),
    }


@torch.no_grad()
def reference_image_case(llava: LoadedCheckpoint, method: Method, image, prompt: str, budget: int, steps: int,
                         options: dict | None = None) -> dict[str, np.ndarray]:
    """Tiled layouts: one image (with its own partitions and token count) and one prompt through
    transformers' modules (`family.reference_features` on the image itself), the placeholder
    expanded to the image's count; the image is recorded so that a client can replay the case."""
    feats = llava.family.reference_features(llava, method, [image], budget, options)
    input_ids, attention_mask = tokenize(llava, [prompt], llava.family.image_placeholders(llava, image,
                                                                                        int(feats.shape[1])))
    return reference_image_from_ids(llava, method, image, input_ids, attention_mask, budget, steps, options, feats)


@torch.no_grad()
def reference_image_from_ids(llava: LoadedCheckpoint, method: Method, image, input_ids: np.ndarray,
                             attention_mask: np.ndarray, budget: int, steps: int, options: dict | None = None,
                             feats: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """`reference_image_case` for an already-tokenized prompt (verify --checkpoint recomputes with it)."""
    if feats is None:
        feats = llava.family.reference_features(llava, method, [image], budget, options)
    return {"image": _recorded(image), **_logits_case(llava, feats, input_ids, attention_mask, budget, steps,
                                                      images=[image])}


def _recorded(image) -> np.ndarray:
    """How a tiled layout's case records its image (uint8 RGB), so that a client can replay it."""
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


@torch.no_grad()
def reference_pruned(llava: LoadedCheckpoint, modules: dict, pixel_values: np.ndarray, prompts: list[str], budget: int,
                     full: int, steps: int) -> dict[str, np.ndarray]:
    """In-LLM methods: transformers' vision tower and projector (all tokens), then tokedge's torch
    prefill (pruning inside) and decoder, greedy for `steps` steps. Checks the tracing; the
    independent PyTorch reference of the pruning lives in the tests."""
    input_ids, attention_mask = tokenize(llava, prompts, full)
    return reference_pruned_from_ids(llava, modules, pixel_values, input_ids, attention_mask, budget, steps)


@torch.no_grad()
def reference_pruned_from_ids(llava: LoadedCheckpoint, modules: dict, pixel_values: np.ndarray | None,
                              input_ids: np.ndarray, attention_mask: np.ndarray, budget: int, steps: int,
                              image=None, per_image=None) -> dict[str, np.ndarray]:
    """`reference_pruned` for already-tokenized inputs (placeholders expanded to all visual tokens).
    `image`: tiled and dynamic layouts, one prompt with this one image (recorded in the case, so that
    a client can replay it) instead of the shared `pixel_values`. `per_image`: dynamic-resolution
    layouts, the `TokenBudget` each image keeps (`image_keep` and DART's quotas as the runtime feeds
    them, `tokedge.reduce.quota.prefill_budget`); positions from the family when it decides them."""
    from tokedge.reduce import get_method
    from tokedge.reduce.quota import image_spans, prefill_budget
    from tokedge.runtime.generate import SamplingConfig, decode_loop

    family = llava.family
    image_token_id = family.image_token_id(llava)
    full = int((input_ids[0] == image_token_id).sum())
    views = [image] if image is not None else torch.from_numpy(np.asarray(pixel_values))
    feats = family.reference_features(llava, get_method("none"), views, full)
    ids_t, mask_t = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
    embeds = family.embed_prompt(llava, ids_t, feats)
    embed = llava.model.get_input_embeddings()  # transformers' API on every model
    positions = (mask_t.cumsum(-1) - 1).clamp(min=0)
    if family.reference_positions is not None:  # M-RoPE: transformers' get_rope_index on the images
        positions = family.reference_positions(llava, ids_t, mask_t, [image] if image is not None else None)
    image_pos = torch.stack([torch.nonzero(row == image_token_id).squeeze(1) for row in ids_t])
    prefill, decoder = modules["prefill"], modules["decoder"]
    spans = image_spans(image_pos[0].tolist())
    keep, quotas = prefill_budget([s.keep for s in prefill.plan.stages], per_image, spans, 1,
                                  getattr(prefill, "spans", False))
    extra = ()
    if getattr(prefill, "blocks", False):  # Gemma 3: each image's tokens one bidirectional block
        from tokedge.runtime.graphs import token_blocks

        extra = (torch.from_numpy(token_blocks(input_ids, image_token_id)),)
    if quotas is not None:
        span = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(spans))
        extra += (span[None].expand(len(ids_t), -1), torch.tensor(quotas)[span][None].expand(len(ids_t), -1))
    out = prefill(embeds, mask_t, positions, image_pos, torch.tensor(keep, dtype=torch.int64), *extra)
    n_kv = 2 * len(decoder.layers)
    logits = out[0][:, -1].float()
    state = {"past": list(out[1 : 1 + n_kv]), "masks": [mask_t, *out[1 + n_kv :]], "last": positions[..., -1:]}

    def step(ids):
        state["masks"] = [torch.cat([m, torch.ones_like(m[:, :1])], dim=1) for m in state["masks"]]
        state["last"] = state["last"] + 1
        text = (torch.full((len(ids), 1), -1, dtype=torch.int64),) if getattr(decoder, "blocks", False) else ()
        o = decoder(embed(torch.from_numpy(ids)[:, None]), *state["masks"], state["last"], *text, *state["past"])
        state["past"] = list(o[1:])
        return o[0][:, -1].float().numpy()

    decoded = decode_loop(logits.numpy(), step, SamplingConfig(max_new_tokens=steps + 1), stop_at_eos=False,
                          keep_logits=True)
    recorded = {} if image is None else {"image": _recorded(image)}
    return {
        **recorded,
        "budget": np.array(budget, dtype=np.int64),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_embeds": feats.float().numpy(),
        "prefill_logits": logits.numpy(),
        "step_logits": np.stack(decoded.step_logits, axis=1),
        "tokens": np.array(decoded.tokens, dtype=np.int64).reshape(input_ids.shape[0], -1),
    }
