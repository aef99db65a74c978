"""Looking inside the model and editing with it, through the attention hook (``sdkit.nn.attention_processors``).

- ``attention_maps``: which pixels each prompt word attends to (DAAM), with ``plot_attention_maps``;
- ``prompt_to_prompt``: change words of a prompt and keep the picture (Hertz et al. 2022): word swap,
  refinement and re-weighting by cross-attention injection;
- ``inversion``: DDIM inversion and null-text inversion of real images, and sampling them back (or edited);
- ``attend_excite``: Attend-and-Excite, attention-guided latent steps so that no subject word is neglected;
- ``words``: where each word sits among the text encoder's tokens, and how two prompts' tokens line up.
"""
from .attend_excite import attend_and_excite
from .attention_maps import AttentionMaps, attention_maps, plot_attention_maps
from .inversion import Inversion, ddim_invert, inverted_eps_fn, null_text_invert, sample_inversion
from .prompt_to_prompt import PromptToPromptResult, prompt_to_prompt
from .words import prompt_words, token_alignment

__all__ = ["AttentionMaps", "PromptToPromptResult", "attention_maps", "plot_attention_maps", "prompt_to_prompt",
           "prompt_words", "token_alignment",
           "Inversion", "ddim_invert", "null_text_invert", "sample_inversion", "inverted_eps_fn", "attend_and_excite"]
