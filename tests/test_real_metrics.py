"""The real-metrics script's code paths on tiny stand-ins of CLIP, DINO and VGG-19 (the
same classes and file layouts a user's downloaded models have)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from bench import real_metrics as rm

# torchvision's vgg19().features: the indices of its 16 convolutions
TORCHVISION_CONVS = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


def _img(colour, stripes: bool = False) -> Image.Image:
    a = np.full((64, 64, 3), colour, np.uint8)
    if stripes:
        a[::4] = 255 - a[::4]
    return Image.fromarray(a)


def test_vgg_layout_and_gram_distance(tmp_path):
    net = rm.vgg19_features()
    convs = tuple(i for i, m in enumerate(net) if isinstance(m, torch.nn.Conv2d))
    assert convs == TORCHVISION_CONVS and len(net) == 37
    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in rm.vgg19_features().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # a full vgg19 file also has these
    save_file(state, str(tmp_path / "vgg19.safetensors"))
    vgg = rm.load_vgg(tmp_path / "vgg19.safetensors")
    ref, same, striped = _img((200, 40, 40)), _img((200, 40, 40)), _img((200, 40, 40), True)
    grams = rm.gram_matrices(vgg, [ref, same, striped], size=64)
    assert [g.shape[0] for g in grams[0]] == [64, 128, 256, 512, 512]
    assert rm.gram_distance(grams[0], grams[1]) == 0.0
    assert rm.gram_distance(grams[0], grams[2]) > 0.0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from lib_ostaf.world import tiny

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
    clip = CLIPModel(CLIPConfig(text_config=tiny.text_config(), vision_config=vision))
    clip.save_pretrained(root / "clip")
    tiny.tokenizer().save_pretrained(root / "clip")
    ViTModel(ViTConfig(**vision), add_pooling_layer=False).save_pretrained(root / "dino")
    return root


def test_clip_t_and_dino_scores(models):
    clip = rm.ClipScorer(models / "clip")
    dino = rm.DinoScorer(models / "dino")
    ref = _img((200, 40, 40))
    images = [ref, _img((20, 40, 220), True)]
    out = rm.score(images, ["a red square", "a blue square"], ref, clip=clip, dino=dino, vgg=None)
    assert set(out) == {"clip_t", "dino", "silhouette_iou", "colour"}
    assert -1.0 <= out["clip_t"] <= 1.0
    alone = rm.score([ref], ["x"], ref, clip=None, dino=dino, vgg=None)
    assert alone["dino"] == pytest.approx(1.0, abs=1e-5)  # the reference itself
    assert out["dino"] < alone["dino"]


def _object(shape: str, colour) -> Image.Image:
    """A 96×96 pale image with one coloured object (a disc or a square)."""
    a = np.full((96, 96, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:96, 0:96]
    inside = (
        (yy - 48) ** 2 + (xx - 48) ** 2 < 30**2
        if shape == "disc"
        else ((abs(yy - 48) < 26) & (abs(xx - 48) < 26))
    )
    a[inside] = colour
    return Image.fromarray(a)


def test_silhouette_and_colour_metrics_and_leak_roles():
    red_disc = _object("disc", (200, 40, 40))
    same = rm.shape_and_colour([_object("disc", (200, 40, 40))], red_disc)
    assert same["silhouette_iou"] > 0.95 and same["colour"] < 0.05
    blue_square = rm.shape_and_colour([_object("square", (40, 40, 200))], red_disc)
    assert blue_square["silhouette_iou"] < same["silhouette_iou"] - 0.1
    assert blue_square["colour"] > 0.9
    # an appearance adapter whose images drift towards the disc silhouette leaks
    rows = [
        {"lambda": 0.0, "silhouette_iou": 0.60, "colour": 0.90},
        {"lambda": 1.0, "silhouette_iou": 0.80, "colour": 0.30},
    ]
    app = rm.with_roles(rows, "appearance")[1]
    assert app["fidelity"]["metric"] == "colour" and app["fidelity"]["gain"] == pytest.approx(0.6)
    assert app["leak"]["metric"] == "silhouette_iou" and app["leak"]["gain"] == pytest.approx(0.2)
    shape = rm.with_roles(rows, "shape")[1]
    assert shape["leak"]["metric"] == "colour" and shape["leak"]["gain"] == pytest.approx(0.6)
