"""anyres: high-resolution images as a base view plus a grid of tower-size tiles (LLaVA-NeXT, Liu et al. 2024).

Each image picks the canvas among the checkpoint's grid pinpoints that keeps the most of its pixels (then wastes
the least), is resized into it keeping its aspect ratio, padded, and cut into tiles the vision tower's size. The
tiles' features go back onto one big map, the padding is cut away again (`unpad`), and a learned newline token
ends each row. LLaVA-OneVision's anyres_max_N also shrinks a map above N tiles' worth of tokens.

The geometry is plain integer math on (height, width) pairs, shared by preprocessing (data.py) and the model
(model.py); `num_tokens` is the one place that says how many placeholders an image needs. It follows
transformers' LlavaNext / LlavaOnevision code, rounding quirks included, so converted checkpoints match it.
"""

import math

import torch
import torch.nn.functional as F


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The (h, w) canvas that shows the image at the highest resolution, and among equals wastes the least area."""
    h, w = size
    best, best_effective, best_waste = None, 0, math.inf
    for ch, cw in pinpoints:
        scale = min(cw / w, ch / h)
        effective = min(int(w * scale) * int(h * scale), w * h)  # pixels kept: no credit for upscaling
        waste = ch * cw - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (ch, cw), effective, waste
    return best


def fit_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the image resized to fill `canvas` along one side, aspect ratio kept."""
    h, w = size
    ch, cw = canvas
    if cw / w < ch / h:
        return min(math.ceil(h * cw / w), ch), cw  # ceil: transformers' get_patch_output_size
    return ch, min(math.ceil(w * ch / h), cw)


def pad_offsets(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(top, left) at which the resized image is pasted: centred, the odd pixel of padding going last."""
    fh, fw = fit_size(size, canvas)
    return (canvas[0] - fh) // 2, (canvas[1] - fw) // 2


def tile_grid(size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """(rows, cols) of tower-size tiles the image is cut into."""
    ch, cw = select_best_resolution(size, pinpoints)
    return ch // tile, cw // tile


def unpad_box(size: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the image's own features inside a (height, width) map of its padded canvas."""
    h, w = size
    if w / h > width / height:  # wider than the map: padding above and below
        new_h = int(round(h * (width / w), 7))  # round to 7 places first, as transformers does, against float noise
        # Quirk kept for parity: the same `pad` is cut from both sides, so an odd leftover row stays at the bottom.
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    new_w = int(round(w * (height / h), 7))
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def shrunk_shape(height: int, width: int, grid: int, max_tiles: int) -> tuple[int, int]:
    """anyres_max_N: a map larger than N tiles' tokens (by more than 10%) is resized to about N tiles' worth."""
    if not max_tiles:
        return height, width
    ratio = math.sqrt(height * width / (max_tiles * grid**2))
    return (int(height // ratio), int(width // ratio)) if ratio > 1.1 else (height, width)


def feature_shape(size: tuple[int, int], pinpoints, tile: int, grid: int, max_tiles=0) -> tuple[int, int]:
    """(rows, cols) of the merged feature map, after unpad and any anyres_max shrink (newlines not counted)."""
    rows, cols = tile_grid(size, pinpoints, tile)
    top, bottom, left, right = unpad_box(size, rows * grid, cols * grid)
    return shrunk_shape(bottom - top, right - left, grid, max_tiles)


def num_tokens(size: tuple[int, int], pinpoints, tile: int, grid: int, max_tiles=0) -> int:
    """Placeholder tokens for one (h, w) image: the base view's grid^2, then each map row plus its newline."""
    h, w = feature_shape(size, pinpoints, tile, grid, max_tiles)
    return grid * grid + h * (w + 1)


def merge_tiles(features, size: tuple[int, int], pinpoints, tile: int, newline, max_tiles=0):
    """features (1 + rows*cols, grid^2, C) of the base view then the tiles, row-major -> (num_tokens, C).

    The tiles' patch grids are laid back side by side into one (rows*grid, cols*grid) map, the padding is cut
    off, the map is shrunk if anyres_max asks, newline (C,) is appended to each row; the base view goes first.
    """
    n, P, C = features.shape
    grid = math.isqrt(P)
    rows, cols = tile_grid(size, pinpoints, tile)
    if n != 1 + rows * cols or grid * grid != P:
        raise ValueError(f"image of size {tuple(size)}: expected 1 + {rows}x{cols} views of a square patch grid, "
                         f"got features of shape {tuple(features.shape)}")
    base, tiles = features[0], features[1:]  # (P, C), (rows*cols, P, C)
    x = tiles.view(rows, cols, grid, grid, C).permute(0, 2, 1, 3, 4)  # (rows, grid, cols, grid, C)
    x = x.reshape(rows * grid, cols * grid, C)  # (H, W, C)
    top, bottom, left, right = unpad_box(size, rows * grid, cols * grid)
    x = x[top:bottom, left:right]  # (h, w, C)
    h, w = shrunk_shape(x.size(0), x.size(1), grid, max_tiles)
    if (h, w) != x.shape[:2]:
        x = F.interpolate(x.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0].permute(1, 2, 0)  # (h', w', C)
    x = torch.cat([x, newline.to(x.dtype).expand(h, 1, C)], dim=1)  # (h, w + 1, C)
    return torch.cat([base, x.reshape(-1, C)])  # (grid^2 + h * (w + 1), C)


def single_view(features, newline):
    """features (1, grid^2, C) of an untiled image (OneVision's multi-image samples) -> (grid^2 + 1, C): the view's
    tokens, then one newline."""
    return torch.cat([features[0], newline.to(features.dtype)[None]])  # (grid^2 + 1, C)


def check_pinpoints(pinpoints, tile: int):
    """Every canvas must be a whole number of tiles: transformers would otherwise cut ragged edge tiles."""
    for pinpoint in pinpoints:
        if len(pinpoint) != 2 or any(not isinstance(s, int) or s <= 0 or s % tile for s in pinpoint):
            raise ValueError(f"grid pinpoint {pinpoint}: expected [height, width], positive multiples of the "
                             f"tile size {tile}")


def video_tokens(frames: int, grid: int) -> int:
    """Placeholder tokens for a video (OneVision): each frame's grid pooled to ceil(grid / 2)^2, then one newline."""
    return frames * math.ceil(grid / 2) ** 2 + 1


def pool_frames(features):
    """(N, grid^2, C) -> (N, ceil(grid/2)^2, C): OneVision's 2x2 bilinear pooling of each frame's feature map."""
    N, P, C = features.shape
    grid = math.isqrt(P)
    x = features.view(N, grid, grid, C).permute(0, 3, 1, 2)  # (N, C, g, g)
    x = F.interpolate(x, size=(math.ceil(grid / 2), math.ceil(grid / 2)), mode="bilinear")  # (N, C, g', g')
    return x.permute(0, 2, 3, 1).reshape(N, -1, C)  # (N, g'^2, C)
