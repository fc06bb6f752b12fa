"""Masks: loading rules, bad masks, the latent grid, automatic masks (IoU on synthetic images)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from lib_ostaf.errors import InputError
from lib_ostaf.method.images import square
from lib_ostaf.method.masks import (
    auto_masks,
    iou,
    latent_weights,
    load_mask,
    resize_mask,
    save_mask,
    square_mask,
)


def scene(shapes, size=(160, 128), background=(226, 222, 214), noise=6.0, seed=0):
    """A synthetic photo: flat shapes on a plain, slightly noisy background + true masks."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, background)
    truth = []
    for kind, box, colour in shapes:
        mask = Image.new("L", size, 0)
        getattr(ImageDraw.Draw(mask), kind)(box, fill=255)
        getattr(ImageDraw.Draw(image), kind)(box, fill=colour)
        truth.append(np.asarray(mask) > 127)
    a = np.asarray(image).astype(np.float64) + rng.normal(0, noise, (size[1], size[0], 3))
    return Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8)), truth


def disc(size=(64, 48), box=(10, 8, 40, 38)) -> Image.Image:
    m = Image.new("L", size, 0)
    ImageDraw.Draw(m).ellipse(box, fill=255)
    return m


def test_binary_mask_from_file_and_alpha(tmp_path):
    m = disc()
    m.save(tmp_path / "m.png")
    loaded = load_mask(tmp_path / "m.png", (64, 48))
    assert loaded.dtype == bool and loaded.shape == (48, 64)
    assert np.array_equal(loaded, np.asarray(m) >= 128)
    # transparency: the opaque part is the object, whatever the colour
    rgba = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    rgba.putalpha(m)
    assert np.array_equal(load_mask(rgba, (64, 48)), loaded)


def test_mask_of_another_size_is_resized_with_a_warning(caplog):
    big = disc(size=(128, 96), box=(20, 16, 80, 76))
    with caplog.at_level(logging.WARNING):
        resized = load_mask(big, (64, 48), label="mask of <a>")
    assert "mask of <a> is 128×96 but the image is 64×48" in caplog.text
    assert resized.shape == (48, 64)
    assert iou(resized, load_mask(disc(), (64, 48))) > 0.9


def test_non_binary_mask_is_thresholded_at_half_with_a_warning(caplog):
    soft = disc().filter(ImageFilter.GaussianBlur(4))
    grey = np.asarray(soft)
    with caplog.at_level(logging.WARNING):
        mask = load_mask(soft, (64, 48))
    assert "not binary" in caplog.text
    assert np.array_equal(mask, grey >= 127.5)
    # an anti-aliased edge alone is not worth a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_mask(disc(), (64, 48))
    assert "not binary" not in caplog.text


@pytest.mark.parametrize(
    "mask,match",
    [
        (np.zeros((48, 64), bool), "empty"),
        (np.full((48, 64), 100, np.uint8), "empty"),  # grey below the threshold
        (np.ones((48, 64), bool), "whole image"),
    ],
)
def test_empty_and_full_masks_are_refused(mask, match):
    with pytest.raises(InputError, match=match):
        load_mask(mask, (64, 48))


def test_unreadable_or_missing_mask(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InputError, match="cannot read"):
        load_mask(tmp_path / "bad.png", (64, 48))
    with pytest.raises(InputError, match="not found"):
        load_mask(tmp_path / "missing.png", (64, 48))


def test_huge_mask_file_refused_before_decoding(tmp_path, monkeypatch):
    """A mask file goes through the same guard as the reference image, named in the error."""
    import lib_ostaf.method.images as images

    Image.new("L", (300, 300), 255).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 299)
    with pytest.raises(InputError, match=r"mask of <mug1> big\.png: 300×300 is too large"):
        load_mask(tmp_path / "big.png", (300, 300), label="mask of <mug1>")


def test_latent_weights_are_cell_coverage():
    mask = np.zeros((128, 128), bool)
    mask[16:48, 24:40] = True  # latent cells rows 2..5, cols 3..4 exactly
    mask[64:68, 64:72] = True  # half of cell (8, 8)
    w = latent_weights(mask, (16, 16))
    assert w.shape == (1, 1, 16, 16)
    assert torch.all(w[0, 0, 2:6, 3:5] == 1.0)
    assert float(w[0, 0, 8, 8]) == 0.5
    assert float(w.sum()) == 8.5  # nothing else
    # feathering: the object keeps weight 1, a halo grows, beyond ⌈2σ⌉ cells stays 0
    f = latent_weights(mask, (16, 16), feather=1.0)
    assert torch.all(f[0, 0, 2:6, 3:5] == 1.0)
    assert 0 < float(f[0, 0, 1, 3]) < 1 and float(f[0, 0, 14, 3]) == 0.0
    assert torch.all(f >= w)
    with pytest.raises(InputError, match="feather"):
        latent_weights(mask, (16, 16), feather=-1)


def test_mask_follows_the_image_through_square_padding():
    """A wide image is padded to a square; the mask must land on the same pixels."""
    image = Image.new("RGB", (96, 48), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((60, 8, 87, 39), fill=(255, 0, 0))
    mask = np.zeros((48, 96), bool)
    mask[8:40, 60:88] = True
    sq = np.asarray(square(image, 96))
    red = (sq[..., 0] > 200) & (sq[..., 1] < 60)
    assert iou(square_mask(mask), red) > 0.95
    # on the latent grid: cells fully inside the red square have weight 1
    w = latent_weights(mask, (12, 12))[0, 0].numpy()
    cells = red.reshape(12, 8, 12, 8).mean(axis=(1, 3))
    assert np.abs(w - cells).max() < 0.15


@pytest.mark.parametrize(
    "size,box", [((200, 150), (120, 30, 170, 110)), ((3000, 40), (1800, 8, 2400, 32))]
)
def test_mask_follows_the_image_through_square_and_resize(size, box):
    """Padded and resized to the model's side, the mask lands where the image's object does."""
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).rectangle(box, fill=(255, 0, 0))
    mask = np.zeros(size[::-1], bool)
    mask[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
    sq = np.asarray(square(image, 128))
    red = (sq[..., 0] > 200) & (sq[..., 1] < 128)
    resized = square_mask(mask, 128)
    assert resized.shape == (128, 128) and resized.dtype == bool
    assert iou(resized, red) > (0.85 if size == (200, 150) else 0.5)
    assert np.array_equal(square_mask(mask), square_mask(mask, max(size)))  # no resize: pad only


def test_a_sliver_survives_the_resize():
    """An object under half a pixel tall at the model's side keeps its best-covered row."""
    mask = np.zeros((40, 3000), bool)
    mask[18:22, 1000:1600] = True  # rows 1498–1501 of the 3000² square: y 63.9–64.1 at 128
    resized = square_mask(mask, 128)
    rows, cols = np.nonzero(resized)
    assert resized.any() and set(rows.tolist()) <= {63, 64}
    assert cols.min() >= 1000 / 3000 * 128 - 1 and cols.max() <= 1600 / 3000 * 128 + 1
    assert np.array_equal(resize_mask(mask, (3000, 40)), mask)


def test_save_mask_round_trip(tmp_path):
    mask = load_mask(disc(), (64, 48))
    path = save_mask(tmp_path / "m.png", mask, overwrite=False)
    assert np.array_equal(load_mask(path, (64, 48)), mask)
    with pytest.raises(InputError, match="already exists"):
        save_mask(path, mask, overwrite=False)


def test_auto_mask_one_object_iou():
    image, (truth,) = scene([("ellipse", (40, 30, 112, 100), (180, 40, 40))])
    (mask,) = auto_masks(image)
    assert iou(mask, truth) >= 0.9
    assert iou(mask, truth) > 0.98  # measured: 1.0 on this image


def test_auto_mask_low_contrast_object_and_determinism():
    image, (truth,) = scene([("ellipse", (40, 30, 112, 100), (95, 95, 95))], background=(130,) * 3)
    first, second = auto_masks(image), auto_masks(image)
    assert np.array_equal(first[0], second[0])
    assert iou(first[0], truth) >= 0.9


def test_auto_masks_two_objects_left_to_right():
    image, truth = scene(
        [
            ("rectangle", (95, 40, 150, 110), (200, 160, 30)),  # right
            ("ellipse", (10, 30, 60, 90), (40, 60, 180)),  # left
        ]
    )
    masks = auto_masks(image, 2)
    assert iou(masks[0], truth[1]) >= 0.9 and iou(masks[1], truth[0]) >= 0.9
    with pytest.raises(InputError, match="found 2 object"):
        auto_masks(image, 3)


def test_auto_mask_of_a_blank_image_fails_clearly():
    with pytest.raises(InputError):
        auto_masks(Image.new("RGB", (64, 64), (200, 200, 200)))


def test_mask_from_editor_payloads():
    from lib_ostaf.method.masks import mask_from_editor

    bg = Image.new("RGB", (32, 32), (90, 90, 90))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (4, 4, 12, 12))
    other = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    other.paste((10, 200, 10, 128), (20, 20, 24, 24))  # any colour, half alpha: painted
    g4 = mask_from_editor({"background": bg, "layers": [layer, other], "composite": bg})
    m = np.asarray(g4) > 127
    assert m.sum() == 8 * 8 + 4 * 4 and m[5, 5] and m[21, 21] and not m[0, 0]
    empty = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert mask_from_editor({"background": bg, "layers": [empty], "composite": bg}) is None
    sketch = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    sketch.paste((255, 255, 255, 255), (0, 0, 16, 32))
    g3 = np.asarray(mask_from_editor({"image": bg, "mask": sketch}))
    assert (g3[:, :16] == 255).all() and (g3[:, 16:] == 0).all()
    assert mask_from_editor({"image": bg, "mask": Image.new("RGBA", (32, 32))}) is None
    assert mask_from_editor(None) is None and mask_from_editor(bg) is bg
    with pytest.raises(InputError):
        mask_from_editor("not an image payload")
