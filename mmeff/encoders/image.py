"""Image tokenizer: patch embedding, interpolatable 2-D position embedding, class token or mean pooling."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from timm.layers import PatchEmbed
from torchvision.transforms import v2

from mmeff.blocks import Tokens
from mmeff.config import ENCODERS, require
from mmeff.encoders.common import GridTokens


@ENCODERS.register("image")
@dataclass
class ImageEncoderConfig:
    """Patch tokenizer options; `key` is the image field of the shard samples."""

    name: str = "image"
    image_size: int = 32
    patch_size: int = 4
    in_chans: int = 1
    key: str = "png"
    pool: Literal["cls", "mean"] = "cls"
    cls_position: Literal["first", "middle", "last"] = "first"
    scan: Literal["raster", "column"] = "raster"
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    augment: bool = True
    rotate: float = 10.0
    translate: float = 0.1
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])

    def __post_init__(self) -> None:
        require(self.patch_size >= 1, "encoder.patch_size", self.patch_size, "an integer >= 1")
        require(self.image_size >= 1 and self.image_size % self.patch_size == 0, "encoder.image_size", self.image_size,
                f"a positive multiple of encoder.patch_size ({self.patch_size})")
        require(self.in_chans >= 1, "encoder.in_chans", self.in_chans, "an integer >= 1")
        require(all(s > 0 for s in self.std), "encoder.std", self.std, "numbers > 0")


class ImageEncoder(GridTokens):
    """Images [B, C, H, W] -> tokens [B, T, D]; `pool` turns backbone output into one vector."""

    def __init__(self, cfg: ImageEncoderConfig, dim: int) -> None:
        patch = PatchEmbed(
            cfg.image_size, cfg.patch_size, cfg.in_chans, dim, flatten=False, output_fmt="NHWC", strict_img_size=False
        )
        super().__init__(dim, patch.grid_size, cfg.pool, cfg.cls_position)
        self.cfg = cfg
        self.patch = patch

    def forward(self, images: torch.Tensor) -> Tokens:
        if images.dim() != 4 or images.shape[1] != self.cfg.in_chans:
            raise ValueError(f"ImageEncoder expects images [B, {self.cfg.in_chans}, H, W], got {tuple(images.shape)}")
        x = self.add_position(self.patch(images))  # [B, h, w, D]
        if self.cfg.scan == "column":
            x = x.transpose(1, 2)
        return self.tokens(x)


class ImageTransform:
    """Decode the image bytes of a shard sample, resize, augment (training) and normalise."""

    def __init__(self, cfg: ImageEncoderConfig, train: bool) -> None:
        self.key, self.mode = cfg.key, "L" if cfg.in_chans == 1 else "RGB"
        steps: list = [v2.PILToTensor(), v2.Resize((cfg.image_size, cfg.image_size), antialias=True)]
        if train and cfg.augment:
            steps.append(v2.RandomAffine(cfg.rotate, (cfg.translate, cfg.translate), tuple(cfg.scale)))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
        self.steps = v2.Compose(steps)

    def __call__(self, sample: dict) -> torch.Tensor:
        data = sample[self.key]
        try:
            image = Image.open(io.BytesIO(data)).convert(self.mode)
        except Exception as e:  # noqa: BLE001  (PIL raises many kinds)
            raise ValueError(f"field {self.key!r} is not a decodable image: {e}") from None
        return self.steps(image)


def build(cfg: ImageEncoderConfig, dim: int) -> ImageEncoder:
    """The image tokenizer of `cfg` with token width `dim`."""
    return ImageEncoder(cfg, dim)


def make_transform(cfg: ImageEncoderConfig, train: bool) -> ImageTransform:
    """Per-sample image preprocessing."""
    return ImageTransform(cfg, train)
