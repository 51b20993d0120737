"""projector.py: token counts and the pixel-shuffle layout."""

import pytest
import torch

from projector import Projector, ProjectorConfig, pixel_shuffle


@pytest.mark.parametrize("kind,tokens", [("linear", 64), ("mlp2x_gelu", 64), ("pixel_shuffle", 16)])
def test_projectors_map_width_and_token_count(kind, tokens):
    cfg = ProjectorConfig(kind, shuffle_factor=2)
    out = Projector(cfg, 32, 48)(torch.randn(3, 64, 32))
    assert out.shape == (3, tokens, 48) and cfg.num_tokens(64) == tokens


def test_pixel_shuffle_merges_each_r_by_r_neighbourhood():
    g, r, C = 4, 2, 3
    x = torch.randn(1, g * g, C)
    grid = x.view(g, g, C)
    out = pixel_shuffle(x, r)  # (1, 4, 12)
    for row in range(g // r):
        for col in range(g // r):
            block = grid[row * r : row * r + r, col * r : col * r + r]  # (r, r, C)
            assert torch.equal(out[0, row * (g // r) + col], block.reshape(-1))


def test_pixel_shuffle_rejects_a_grid_it_cannot_fold():
    with pytest.raises(ValueError, match="square grid divisible by 2"):
        pixel_shuffle(torch.randn(1, 17, 3), 2)


def test_unknown_projector_is_refused():
    with pytest.raises(ValueError, match="unknown projector 'mlp3x'"):
        ProjectorConfig("mlp3x")
