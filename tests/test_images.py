"""Reference images: every common mode converts, bad files give a clear error."""

import numpy as np
import pytest
from PIL import Image

from lib_ostaf.errors import InputError
from lib_ostaf.method.augment import make_views
from lib_ostaf.method.images import load_image, square


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("RGBA", (40, 30), (255, 0, 0, 0)),
        lambda: Image.new("P", (40, 30), 3),
        lambda: Image.fromarray(np.full((30, 40), 40000, np.uint16)),
        lambda: Image.new("L", (40, 30), 128),
        lambda: Image.new("1", (40, 30), 1),
        lambda: Image.new("CMYK", (40, 30), (0, 255, 0, 0)),
        lambda: Image.new("LA", (40, 30), (90, 128)),
        lambda: Image.new("I;16", (40, 30), 3000),
    ],
)
def test_modes_convert_to_rgb(tmp_path, make):
    path = tmp_path / "x.png" if make().mode != "CMYK" else tmp_path / "x.jpg"
    make().save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)


def _marked(size=(60, 40)) -> Image.Image:
    """Grey with a red top-left corner and a blue bottom-right one (orientation is visible)."""
    c = size[0] // 5  # corner side
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((230, 20, 20), (0, 0, c, c))
    image.paste((20, 20, 230), (size[0] - c, size[1] - c, size[0], size[1]))
    return image


@pytest.mark.parametrize(
    "orientation,stored",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),  # stored turned left; "rotate right to display"
        (8, Image.Transpose.ROTATE_270),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, stored):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _marked().transpose(stored).save(tmp_path / "x.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "x.jpg")
    assert image.size == (60, 40)
    r, g, b = image.getpixel((3, 3))
    assert r > 180 and g < 80 and b < 80, (r, g, b)
    r, g, b = image.getpixel((56, 36))
    assert b > 180 and r < 80, (r, g, b)


@pytest.mark.parametrize(
    "fmt,options",
    [
        ("WEBP", {"lossless": True}),
        ("WEBP", {"quality": 90}),
        ("JPEG", {"progressive": True, "quality": 95}),
    ],
)
def test_webp_and_progressive_jpeg(tmp_path, fmt, options):
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"x.{fmt.lower()}"
    _marked().save(path, fmt, **options)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (60, 40)
    diff = np.abs(np.asarray(image, int) - np.asarray(_marked(), int))
    assert diff.mean() < 4  # lossy formats blur the corners' edges (chroma subsampling)
    assert np.abs(np.asarray(image.getpixel((3, 3))) - (230, 20, 20)).max() < 24
    assert np.abs(np.asarray(image.getpixel((56, 36))) - (20, 20, 230)).max() < 24


def test_transparent_webp_becomes_white(tmp_path):
    from PIL import features

    if not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 20, 20))
    rgba.save(tmp_path / "x.webp", lossless=True)
    image = load_image(tmp_path / "x.webp")
    assert image.getpixel((2, 2)) == (255, 255, 255) and image.getpixel((15, 15)) == (0, 0, 255)


def test_phone_photo_size_squares_to_the_model(tmp_path):
    _marked((4032, 3024)).save(tmp_path / "phone.jpg", quality=85)
    image = load_image(tmp_path / "phone.jpg")
    assert image.size == (4032, 3024)
    out = np.asarray(square(image, 128), int)
    assert out.shape == (128, 128, 3)
    # padded top/bottom by (4032 − 3024) / 2 rows: 16 px at 128; the red corner follows
    assert out[20, 1, 0] > 180 and out[20, 1, 1] < 80
    assert np.abs(out[4, 64] - 128).max() <= 2  # padding is the border's median grey


def test_transparent_pixels_become_white():
    image = load_image(Image.new("RGBA", (20, 20), (255, 0, 0, 0)))
    assert image.getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped():
    a = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    image = load_image(Image.fromarray(a))
    arr = np.asarray(image)[..., 0]
    assert arr.min() == 0 and arr.max() == 255


def test_bad_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match="cannot read"):
        load_image(junk)
    torn = tmp_path / "torn.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    torn.write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(InputError):
        load_image(torn)
    with pytest.raises(InputError, match="at least"):
        load_image(Image.new("RGB", (8, 100)))


def test_huge_image_refused_before_decoding(tmp_path, monkeypatch):
    import lib_ostaf.method.images as images

    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 300 * 299)
    with pytest.raises(InputError, match="too large"):
        load_image(tmp_path / "big.png")


def test_square_keeps_whole_object():
    image = Image.new("RGB", (100, 50), (10, 20, 30))
    out = square(image, 64)
    assert out.size == (64, 64)
    # padding uses the border colour: the result is uniform
    assert np.ptp(np.asarray(out), axis=(0, 1)).max() <= 1


def _striped_reference() -> tuple[Image.Image, np.ndarray]:
    """A red object with dark diagonal stripes, 32×24 px, on a pale background."""
    a = np.full((64, 64, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:64, 0:64]
    obj = (yy >= 16) & (yy < 48) & (xx >= 20) & (xx < 44)
    dark = ((xx + yy) // 4) % 2 == 1
    a[obj] = (200, 40, 40)
    a[obj & dark] = (70, 14, 14)
    return Image.fromarray(a), obj


def test_shape_views_keep_the_silhouette_in_place_and_vary_colour_and_texture():
    ref, obj = _striped_reference()
    views = make_views(ref, "shape", 6, seed=1, mask=obj, cell=4)
    colours = set()
    for v in views:
        a = np.asarray(v).astype(int)
        background = a[0, 0]
        fg = np.abs(a - background).max(-1) > 0
        assert (fg == obj).all()  # the same outline, in place
        colours.add(tuple(a[fg].max(0)))
    assert len(colours) == 6  # every view has a new colour
    again = make_views(ref, "shape", 6, seed=1, mask=obj, cell=4)
    assert [v.tobytes() for v in again] == [v.tobytes() for v in views]


def test_appearance_views_keep_the_texture_and_vary_the_silhouette():
    ref, obj = _striped_reference()
    ref_colours = {tuple(c) for c in np.asarray(ref)[obj]}
    views = make_views(ref, "appearance", 6, seed=2, mask=obj, cell=4)
    shapes = set()
    for v in views:
        a = np.asarray(v)
        inside = np.abs(a.astype(int) - 235).max(-1) > 40
        solid = a[inside]
        # fully covered pixels are the reference's own colours (edges are blended)
        assert np.mean([tuple(c) in ref_colours for c in solid]) > 0.6
        assert {(200, 40, 40), (70, 14, 14)} <= {tuple(c) for c in solid}
        shapes.add(inside.tobytes())
    assert len(shapes) == 6
    # an automatic mask finds the object when none is given
    auto = make_views(ref, "appearance", 2, seed=2, cell=4)
    assert all(np.asarray(v).shape == (64, 64, 3) for v in auto)


def test_shape_views_without_an_object_keep_the_image_structure():
    """Nothing stands out (a full-frame texture): the views vary its hues, not a blank fill."""
    yy, xx = np.mgrid[0:64, 0:64]
    a = np.stack([(xx * 4) % 256, (yy * 4) % 256, np.full_like(xx, 90)], -1).astype(np.uint8)
    ref = Image.fromarray(a)
    views = make_views(ref, "shape", 4, seed=0, mask=np.ones((64, 64), bool))
    ref_hsv = np.asarray(ref.convert("HSV")).astype(int)
    hues = set()
    for v in views:
        hsv = np.asarray(v.convert("HSV")).astype(int)
        assert np.abs(hsv[..., 2] - ref_hsv[..., 2]).max() <= 3  # brightness structure kept
        hues.add(int(np.median((hsv[..., 0] - ref_hsv[..., 0]) % 256)))
    assert len(hues) == 4  # each view a different hue rotation


def test_views_refuse_bad_input():
    ref, obj = _striped_reference()
    with pytest.raises(InputError, match="attribute"):
        make_views(ref, "colour", 2, seed=0)
    with pytest.raises(InputError, match="mask"):
        make_views(ref, "shape", 2, seed=0, mask=obj[:32])
    style = make_views(ref, "style", 3, seed=0)
    assert style[0] is ref and len(style) == 3
