"""Building blocks of Stable Diffusion v1, one concern per file (CompVis names and layout).

    from sdkit.nn import UNetModel, SpatialTransformer, CrossAttention, AutoencoderKL, FrozenCLIPEmbedder

- ``unet``: the UNet (CompVis openaimodel layout), ResBlock, timestep embedding;
- ``attention``: CrossAttention (its processor hook), the transformer block, the spatial transformer;
  ``attention_processors``: install processors that record or edit attention;
- ``autoencoder``: Encoder/Decoder, AutoencoderKL, VQModel; ``distributions``, ``quantize``: their latents;
- ``text``: the frozen CLIP and MiniLM text encoders; ``tokenizer``: CLIP's BPE; ``clip_transformer``: the layer
  stack shared by CLIP's text and vision towers; ``clip_vision``: the vision tower (safety checker);
- ``losses``: autoencoder losses and the PatchGAN discriminator; ``rescaler``, ``x_transformer``: the remaining
  latent-diffusion conditioners.

Names are imported on first use (``dir(sdkit.nn)`` lists them).
"""
from ..lazy import lazy_exports

_EXPORTS = {
    "UNetModel": "unet", "ResBlock": "unet", "timestep_embedding": "unet", "AttentionBlock": "unet",
    "CrossAttention": "attention", "BasicTransformerBlock": "attention", "SpatialTransformer": "attention",
    "fused_attention": "attention", "explicit_attention": "attention",
    "attention_processor": "attention_processors", "set_attention_processor": "attention_processors",
    "attention_layers": "attention_processors", "AttentionRecorder": "attention_processors",
    "ExplicitAttention": "attention_processors",
    "Encoder": "autoencoder", "Decoder": "autoencoder", "AutoencoderKL": "autoencoder", "VQModel": "autoencoder",
    "VQModelInterface": "autoencoder", "DiagonalGaussianDistribution": "distributions",
    "VectorQuantizer": "quantize",
    "FrozenCLIPEmbedder": "text", "FrozenMiniLMEmbedder": "text", "CLIPTextModel": "text",
    "CLIPTokenizer": "tokenizer", "CLIPEncoder": "clip_transformer", "CLIPVisionModel": "clip_vision",
    "LPIPSWithDiscriminator": "losses", "NLayerDiscriminator": "losses", "SpatialRescaler": "rescaler",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
__all__ = sorted(_EXPORTS)
