"""Looking inside the model and editing with it, through the attention hook (``sdkit.nn.attention_processors``).

- ``attention_maps``: which pixels each prompt word attends to (DAAM), with ``plot_attention_maps``;
- ``prompt_to_prompt``: change words of a prompt and keep the picture (Hertz et al. 2022): word swap,
  refinement and re-weighting by cross-attention injection;
- ``words``: where each word sits among the text encoder's tokens, and how two prompts' tokens line up.
"""
from .attention_maps import AttentionMaps, attention_maps, plot_attention_maps
from .prompt_to_prompt import PromptToPromptResult, prompt_to_prompt
from .words import prompt_words, token_alignment

__all__ = ["AttentionMaps", "PromptToPromptResult", "attention_maps", "plot_attention_maps", "prompt_to_prompt",
           "prompt_words", "token_alignment"]
