"""vLLM plugin: makes PIIP-LLaVA directories servable by `vllm serve DIR` and `LLM(model=DIR)`.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (the API server and
every engine worker) before it reads a model config. `register` then

- imports `piip_llava`, which registers our config, model and processor classes with
  transformers' Auto classes, so the worker can build the model and the processor from `DIR`;
- names our architecture in vLLM's model registry as served by vLLM's Transformers backend
  (`TransformersMultiModalForCausalLM`): vLLM finds a non-transformers architecture only in its own
  registry or through a config's `auto_map` (remote code, which we never use).

The Transformers backend then runs our own modeling code, with vLLM's paged attention swapped in
for the language model's attention.
"""

from __future__ import annotations

from ..models.piip_llava.modeling_piip_llava import PIIPLlavaForConditionalGeneration

TRANSFORMERS_BACKEND_CLASS = "vllm.model_executor.models.transformers:TransformersMultiModalForCausalLM"

SERVED_ARCHITECTURES = (PIIPLlavaForConditionalGeneration.__name__,)


def register() -> None:
    """Register PIIP-LLaVA with transformers' Auto classes and vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    import piip_llava  # noqa: F401  (registers the Auto classes)

    for architecture in SERVED_ARCHITECTURES:
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, TRANSFORMERS_BACKEND_CLASS)
