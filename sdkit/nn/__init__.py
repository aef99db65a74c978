"""Building blocks of Stable Diffusion v1, one concern per file (CompVis names and layout)."""
