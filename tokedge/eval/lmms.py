"""lmms-eval model `tokedge`: any lmms-eval task on a deployed artifact, through the device runtime.

    lmms_eval --model tokedge --model_args artifact=./tiny-llava-random-64 --tasks pope --limit 50

Registered through lmms-eval's documented plug-in mechanism for external models, the Python
entry-point group `lmms_eval.models` (pyproject.toml: `tokedge = "tokedge.eval.lmms:manifest"`),
which lmms-eval 0.7 reads when it builds its model registry. Only lmms-eval imports this module
(it needs lmms-eval, hence torch); tokedge itself never does.

model_args: `artifact` (required), `backend` (onnxruntime, ort-cuda, ort-tensorrt, tensorrt),
`engines` (tensorrt), `budget` (an artifact with a runtime budget), `max_new_tokens` (default when
a task's generation_kwargs give none: 128). Decoding is greedy whatever the task asks (tokedge
runs what `tokedge run` runs); `until` stop strings cut the text after generation.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

DEFAULT_NEW_TOKENS = 128


def manifest():
    """The entry point's payload: lmms-eval's ModelManifest for model id `tokedge`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokedge", simple_class_path="tokedge.eval.lmms.Tokedge")


class Tokedge(lmms):
    """One artifact opened with `Pipeline.load`; each request generated alone (batch 1)."""

    is_simple = True

    def __init__(self, artifact: str, backend: str = "onnxruntime", engines: str | None = None,
                 budget: int | str | None = None, max_new_tokens: int | str = DEFAULT_NEW_TOKENS,
                 batch_size: int | str = 1, **kwargs) -> None:
        super().__init__()
        from tokedge.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(artifact, backend=backend, engines=engines)
        self.budget = int(budget) if budget not in (None, "", "None") else None
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            images = [v.convert("RGB") for v in (visuals if isinstance(visuals, list) else [visuals])]
            kwargs = dict(gen_kwargs or {})
            tokens = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
            result = self.pipe.generate(images, context, max_new_tokens=tokens, budget=self.budget)
            text = result.text
            until = kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("tokedge answers single-round requests (generate_until)")

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("tokedge artifacts generate; loglikelihood tasks are not supported")
