"""video.py: frames sampled uniformly from a video file, a folder of frames or an animated GIF/WebP."""

import sys

import numpy as np
import pytest
from PIL import Image

from video import VideoError, read_video, sample_indices

COLORS = [(20 * i, 250 - 20 * i, (70 * i) % 256) for i in range(12)]  # frame i is a flat, distinct colour


def frames(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (32, 24), COLORS[i]) for i in range(n)]


def colors(images) -> list[tuple]:
    return [tuple(int(c) for c in np.asarray(im).reshape(-1, 3).mean(0).round()) for im in images]


def nearest(images) -> list[int]:
    """Which of COLORS each (lossily compressed) frame is closest to."""
    return [int(np.argmin([sum((a - b) ** 2 for a, b in zip(c, ref, strict=True)) for ref in COLORS]))
            for c in colors(images)]


@pytest.mark.parametrize("total,n", [(10, 4), (8, 8), (100, 16), (5, 1), (2, 2)])
def test_sample_indices_are_onevisions_linspace(total, n):
    assert sample_indices(total, n) == np.linspace(0, total - 1, n, dtype=int).tolist()


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animated_images_give_the_uniformly_sampled_frames(tmp_path, suffix):
    path = tmp_path / f"clip{suffix}"
    first, *rest = frames(10)
    first.save(path, save_all=True, append_images=rest, duration=40, loop=0, lossless=True)
    assert nearest(read_video(path, 4)) == [0, 3, 6, 9]


def test_a_folder_of_frames_is_read_in_name_order(tmp_path):
    for i, image in reversed(list(enumerate(frames(10)))):  # written out of order: the names decide
        image.save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert colors(read_video(tmp_path, 3)) == [COLORS[0], COLORS[4], COLORS[9]]


def test_a_video_file_is_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")  # requirements-dev installs it; at run time it is optional
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for image in frames(12):
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    assert nearest(read_video(path, 4)) == [0, 3, 7, 11]


def test_too_few_frames_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "short.gif"
    first, *rest = frames(3)
    first.save(path, save_all=True, append_images=rest)
    with pytest.raises(VideoError, match=r"short\.gif: has 3 frames, fewer than the 8 asked"):
        read_video(path, 8)


def test_undecodable_video_is_one_line_naming_the_file(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"this is not a video")
    with pytest.raises(VideoError, match=r"broken\.mp4: cannot decode video"):
        read_video(path, 4)
    with pytest.raises(FileNotFoundError, match="nope.mp4: no such video"):
        read_video(tmp_path / "nope.mp4", 4)


def test_without_pyav_a_video_file_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(VideoError, match=r"clip\.mp4: reading video files needs PyAV: pip install av"):
        read_video(path, 4)
