"""Model loading: hub ids, local diffusers folders, single checkpoint files and the built-in ``tiny`` model.

``load_model(...)`` returns a :class:`LoadedModel` (U-Net, VAE, text encoder, tokenizer, noise schedule) on its device
and dtype; :class:`~streamdiff.models.prompts.PromptEncoder` turns prompts into cached embeddings. Next: open streams
on a :class:`~streamdiff.engine.StreamEngine` (or a :class:`~streamdiff.pipeline.StreamPipeline`).
"""

from __future__ import annotations

from .loading import LoadedModel, LoraSpec, load_model, load_vae, model_from_components, resolve_model_path

__all__ = ["LoadedModel", "LoraSpec", "load_model", "load_vae", "model_from_components", "resolve_model_path"]
