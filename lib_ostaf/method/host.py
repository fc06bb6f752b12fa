"""What a host (A1111, Forge, diffusers) gives the trainer: a small protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

# Host-specific conditioning (a tensor, or a dict of them for SDXL); opaque to the trainer.
Conditioning = Any
# New tokens' vectors: token → one [n_vectors, width] tensor per text encoder, in order.
Embeddings = Mapping[str, Sequence[torch.Tensor]]
# The same for one text encoder: token → its [n_vectors, width] tensor.
TokenVectors = Mapping[str, torch.Tensor]


class TextEncoder(Protocol):
    """One text encoder as object implantation needs it (``lib_ostaf.method.embeddings.ClipText``
    implements it for transformers CLIP)."""

    key: str  # "clip_l" | "clip_g": the encoder's key in embedding files
    width: int  # token embedding width (768 CLIP-L, 1024 OpenCLIP-H, 1280 OpenCLIP-G)
    projection_dim: int | None  # width of its own text projection, None if it has none

    def has_token(self, token: str) -> bool:
        """Whether ``token`` is already one entry of the tokenizer's vocabulary."""
        ...

    def word_vectors(self, text: str) -> torch.Tensor:
        """Input-embedding rows of ``text``'s tokens, ``[n_tokens, width]``, detached."""
        ...

    def pooled(
        self, prompt: str, vectors: TokenVectors | None = None, *, project: bool = True
    ) -> torch.Tensor:
        """EOS feature ``[d]`` of ``prompt`` with ``vectors`` spliced in (differentiable),
        through the encoder's projection when it has one and ``project``."""
        ...


class Host(Protocol):
    """The loaded model, seen through the host's own call path. Never a second copy."""

    unet: nn.Module
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # [num_train_timesteps], float32, on CPU
    device: torch.device
    dtype: torch.dtype  # compute dtype of the UNet
    resolution: int  # native training resolution in pixels
    base_model_name: str
    # Object implantation only: the text encoders in the order embeddings list their tensors.
    text_encoders: Sequence[TextEncoder]

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """RGB image at ``resolution`` → scaled latents [1, C, h, w] (deterministic)."""
        ...

    def encode_prompt(self, prompt: str, embeddings: Embeddings | None = None) -> Conditioning:
        """Prompt → conditioning for :meth:`predict_noise` (batch 1).

        ``embeddings`` (object implantation) splices the vectors of new tokens in where the
        tokens occur; the result is then differentiable in those vectors. Without it the
        host's usual (no-grad) path is used.
        """
        ...

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction (eps or v, see ``prediction_type``) through the host."""
        ...
