"""LoRA for SD v1: apply, scale, merge, unmerge and remove low-rank updates of the attention layers (and of the
CLIP text encoder), read and write the kohya/A1111 and diffusers/PEFT files, and train one with ``sdkit train``.

    from sdkit.lora import load_lora
    lora = load_lora(model, "style.safetensors", scale=0.8)     # model: sdkit.load_model(...)
    lora.merge(); lora.unmerge(); lora.scale = 0.5; lora.remove()

Files: ``files.py`` (the two layouts), the model's layers and their names: ``targets.py``, the update and how it
joins a layer through forward hooks: ``adapters.py``, the handle and the entry points: ``apply.py``, training:
``training.py`` (an add-on of ``sdkit.training.diffusion.LatentDiffusionModule``).

Why not peft as the implementation: peft injects LoRA by replacing each targeted module with a ``LoraLayer``
wrapper that holds the original as ``base_layer``, so ``to_q.weight`` becomes ``to_q.base_layer.weight`` and
``lora_A.default.weight`` keys join the state dict; sdkit's contract is that the model keeps exactly the CompVis
keys. It would also not see the SpatialTransformer's 1x1 convs, which sdkit applies as matrix products without
calling the conv modules. peft (with diffusers) is the test oracle instead.
"""
from ..lazy import lazy_exports

# imported on first use, so that the command line's argument parsing (lora/arguments.py) does not import torch
_EXPORTS = {
    **dict.fromkeys(("LoRA", "applied_loras", "apply_lora", "create_lora", "load_lora", "match_layers", "save_lora"),
                    "apply"),
    **dict.fromkeys(("LayerWeights", "LoRAError", "LoRAFile", "read_lora", "write_lora"), "files"),
    "find_targets": "targets",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = ["LayerWeights", "LoRA", "LoRAError", "LoRAFile", "applied_loras", "apply_lora", "create_lora",
           "find_targets", "load_lora", "match_layers", "read_lora", "save_lora", "write_lora"]
