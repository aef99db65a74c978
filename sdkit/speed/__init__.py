"""Speed switches a user can turn on, each a context manager over a loaded model (issue 21):

- :func:`channels_last`: NHWC memory layout for the UNet's convolutions;
- :func:`bf16_autocast`: bfloat16 matrix products on the CPU (or any ``torch.autocast`` device);
- :func:`compiled`: ``torch.compile`` of the UNet, keys unchanged;
- :func:`deep_cache`: reuse the UNet's deep features across steps (DeepCache);
- :func:`token_merging`: merge redundant keys/values in self-attention (ToMe for SD).

They combine (``with deep_cache(model), bf16_autocast(): ...``). What each gains in speed and costs in quality is
measured by ``benchmarks/speed_switches.py``; its table is in the README.
"""
from .deep_cache import deep_cache
from .switches import bf16_autocast, channels_last, compiled
from .token_merging import merge_tokens, token_merging

__all__ = ["bf16_autocast", "channels_last", "compiled", "deep_cache", "merge_tokens", "token_merging"]
