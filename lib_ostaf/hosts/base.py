"""What a host (A1111, Forge, diffusers) gives the trainer: a small protocol."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

# Host-specific conditioning (a tensor, or a dict of them for SDXL); opaque to the trainer.
Conditioning = Any


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

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """RGB image at ``resolution`` → scaled latents [1, C, h, w] (deterministic)."""
        ...

    def encode_prompt(self, prompt: str) -> Conditioning:
        """Prompt → conditioning for :meth:`predict_noise` (batch 1)."""
        ...

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction (eps or v, see ``prediction_type``) through the host."""
        ...
