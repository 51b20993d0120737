"""anyres (LLaVA-NeXT / OneVision tiles): geometry, preprocessing and feature merging against transformers."""

import numpy as np
import pytest
from PIL import Image

import anyres
from data import preprocess_anyres
from vit import ViTConfig

TILE = 32  # the tiny towers' image size
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]  # llava-hf's defaults, scaled from 336 to 32
# (h, w): wide, tall, square, one that needs padding, one larger than every pinpoint, one tiny, one extreme
SIZES = [(40, 90), (90, 40), (50, 50), (37, 53), (300, 500), (7, 11), (20, 400)]


def photo(h: int, w: int, seed=0) -> Image.Image:
    """A smooth random RGB image: resampling it exercises interpolation, unlike flat noise or a flat colour."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    noisy = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    return Image.fromarray((noisy + g.integers(-20, 21, noisy.shape)).clip(0, 255).astype(np.uint8))


def next_processor(vision: ViTConfig, pinpoints=PINPOINTS):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    S = vision.image_size
    return LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                      image_grid_pinpoints=pinpoints, image_mean=list(vision.image_mean),
                                      image_std=list(vision.image_std))


@pytest.mark.parametrize("size", SIZES)
def test_best_resolution_and_fit_match_transformers(size):
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    best = anyres.select_best_resolution(size, PINPOINTS)
    assert best == tuple(select_best_resolution(size, PINPOINTS))
    pixels = np.zeros((3, *size))
    assert anyres.fit_size(size, best) == get_patch_output_size(pixels, best, input_data_format="channels_first")


@pytest.mark.parametrize("size", SIZES)
def test_preprocess_anyres_matches_llava_next_processor(size):
    vision = ViTConfig(image_size=TILE, patch_size=8)
    image = photo(*size)
    ours = preprocess_anyres(image, vision, PINPOINTS)
    ref = next_processor(vision)(image, return_tensors="pt")
    rows, cols = anyres.tile_grid(size, PINPOINTS, TILE)
    assert ours.shape == (1 + rows * cols, 3, TILE, TILE)
    assert ref["image_sizes"].tolist() == [list(size)]
    theirs = ref["pixel_values"][0, : len(ours)]  # the processor zero-pads every image to the batch's most views
    assert (ours - theirs).abs().max().item() < 1e-5


def test_pinpoints_must_be_whole_tiles():
    anyres.check_pinpoints(PINPOINTS, TILE)
    with pytest.raises(ValueError, match=r"grid pinpoint \[32, 40\]"):
        anyres.check_pinpoints([[32, 64], [32, 40]], TILE)
