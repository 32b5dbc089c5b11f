"""Image tokenizer: shapes, pooling choices, position interpolation, transform."""

import io

import pytest
import torch
from PIL import Image

from mmeff.encoders.image import ImageEncoder, ImageEncoderConfig, ImageTransform


@pytest.mark.parametrize("pool, where", [("cls", "first"), ("cls", "middle"), ("cls", "last"), ("mean", "first")])
def test_tokens_and_pool(pool, where):
    enc = ImageEncoder(ImageEncoderConfig(image_size=16, patch_size=4, pool=pool, cls_position=where), dim=24)
    out = enc(torch.randn(3, 1, 16, 16))
    tokens = out.x
    assert tokens.shape == (3, 16 + (pool == "cls"), 24)
    # The layout names the 4x4 grid after a leading class token, or none where the class token splits it.
    cls_first, cls_middle = pool == "cls" and where == "first", pool == "cls" and where == "middle"
    assert out.layout.grid == (None if cls_middle else (1, 4, 4)) and out.layout.special == int(cls_first)
    assert enc.pool(tokens).shape == (3, 24)
    if pool == "cls":
        i = {"first": 0, "middle": 8, "last": 16}[where]
        assert torch.equal(tokens[:, i], enc.cls.expand(3, 1, 24)[:, 0])
        assert torch.equal(enc.pool(tokens), tokens[:, i])


def test_tokens_are_contiguous_so_the_norms_read_them_in_place():
    # The NHWC patch embedding is a permuted view of the conv's output; left so, the residual adds kept its layout
    # through the backbone and every norm copied its input (25 copy kernels of a ViT-S step on the H200).
    enc = ImageEncoder(ImageEncoderConfig(image_size=16, patch_size=4, in_chans=3, pool="mean"), dim=24)
    x = enc(torch.randn(2, 3, 16, 16)).x
    assert x.is_contiguous() and (x + torch.randn_like(x)).is_contiguous()  # the residual stream stays so


def test_position_embedding_interpolates_to_other_sizes():
    enc = ImageEncoder(ImageEncoderConfig(image_size=16, patch_size=4, pool="mean"), dim=24)
    out = enc(torch.randn(1, 1, 32, 32))
    assert out.x.shape == (1, 64, 24) and out.layout.grid == (1, 8, 8)


def test_column_scan_is_a_transpose_of_raster():
    raster = ImageEncoder(ImageEncoderConfig(image_size=8, patch_size=4, pool="mean"), dim=8)
    column = ImageEncoder(ImageEncoderConfig(image_size=8, patch_size=4, pool="mean", scan="column"), dim=8)
    column.load_state_dict(raster.state_dict())
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(column(x).x[:, [0, 2, 1, 3]], raster(x).x)


def test_wrong_channels_named():
    enc = ImageEncoder(ImageEncoderConfig(image_size=16, patch_size=4), dim=8)
    with pytest.raises(ValueError, match=r"images \[B, 1, H, W\], got \(2, 3, 16, 16\)"):
        enc(torch.randn(2, 3, 16, 16))


def test_transform_decodes_resizes_and_normalises():
    buf = io.BytesIO()
    Image.new("L", (32, 32), color=255).save(buf, format="PNG")
    out = ImageTransform(ImageEncoderConfig(image_size=16), train=False)({"png": buf.getvalue()})
    assert out.shape == (1, 16, 16) and torch.allclose(out, torch.ones_like(out))
    with pytest.raises(ValueError, match="'png' is not a decodable image"):
        ImageTransform(ImageEncoderConfig(), train=False)({"png": b"garbage"})
