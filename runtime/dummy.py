"""What a dummy build (`--load-format dummy`) has instead of a text encoder and a VAE.

A dummy bundle carries a real-size transformer with random weights and neither the text encoder
(UMT5-XXL or T5-XXL, 4.7 B parameters) nor the VAE: their size is not what the dummy path checks.
A prompt's embeddings are drawn from the prompt itself at the model's real text shape (the same
prompt, the same embeddings), an image's conditioning likewise from the image, and frames are
blank: what a run of it shows is the denoising loop's speed and memory.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def dummy_embeddings(prompts: list[str], text_shape: tuple[int, int]) -> np.ndarray:
    """Embeddings [B, tokens, channels] drawn from each prompt's SHA-256, unit variance like the
    encoders' outputs after their final norm."""
    rows = []
    for prompt in prompts:
        seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
        rows.append(torch.randn(text_shape, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows).numpy()


def blank_frames(batch: int, frames: int, height: int, width: int) -> np.ndarray:
    """Mid-grey frames [B, T, H, W, 3]: a dummy build has no VAE to decode its latents."""
    return np.full((batch, frames, height, width, 3), 0.5, np.float32)


def dummy_conditions(image: np.ndarray, batch: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """An image-to-video model's image inputs [batch, ...] at their real `shapes`, drawn from the
    image's SHA-256 (no VAE or image encoder in a dummy build): the same image, the same inputs."""
    seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g).expand(batch, *shape) for k, shape in shapes.items()}
