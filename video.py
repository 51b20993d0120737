"""Video input: a clip as a few frames sampled uniformly over its length, as LLaVA-OneVision reads video.

Three sources: a video file through PyAV (`pip install av`, imported only here and only for files), a folder of
frame images (in name order), or an animated GIF / WebP through Pillow. Each gives a list of RGB PIL images;
data.preprocess_video turns them into the tower's pixels.
"""

from pathlib import Path

from PIL import Image, ImageSequence

ANIMATED = (".gif", ".webp")
FRAME_FILES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class VideoError(ValueError):
    """A video that cannot be read or is too short, worth one line naming the file."""


def sample_indices(total: int, n: int) -> list[int]:
    """n frame indices spread evenly from the first frame to the last (LLaVA-OneVision's np.linspace(0, total-1, n))."""
    if n == 1:
        return [0]
    return [int(i * (total - 1) / (n - 1)) for i in range(n)]


def read_video(path, frames: int) -> list[Image.Image]:
    """`frames` RGB frames sampled uniformly from a video file, a folder of frames or an animated GIF/WebP."""
    path = Path(path)
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if path.is_dir():
        return read_folder(path, frames)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video")
    if path.suffix.lower() in ANIMATED:
        return read_animated(path, frames)
    return read_file(path, frames)


def check_length(path, total: int, frames: int):
    if total < frames:
        raise VideoError(f"{path}: has {total} frames, fewer than the {frames} asked (lower --frames)")


def read_folder(path: Path, frames: int) -> list[Image.Image]:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_FILES)
    check_length(path, len(files), frames)
    out = []
    for i in sample_indices(len(files), frames):
        try:
            with Image.open(files[i]) as image:
                out.append(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise VideoError(f"{files[i]}: not a readable frame ({err})") from None
    return out


def read_animated(path: Path, frames: int) -> list[Image.Image]:
    try:
        with Image.open(path) as image:
            total = getattr(image, "n_frames", 1)
            indices = sample_indices(total, frames) if total >= frames else []
            kept = {i: f.convert("RGB") for i, f in enumerate(ImageSequence.Iterator(image)) if i in set(indices)}
    except (OSError, SyntaxError, ValueError) as err:
        raise VideoError(f"{path}: not a readable animation ({err})") from None
    check_length(path, total, frames)
    return [kept[i] for i in indices]


def read_file(path: Path, frames: int) -> list[Image.Image]:
    """Decode with PyAV, keeping only the sampled frames in memory. The frame count comes from the container, or
    from counting packets when it does not say; frames are then decoded in order (seeking is not frame-exact)."""
    try:
        import av
    except ImportError:
        raise VideoError(f"{path}: reading video files needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]  # IndexError: no video stream
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            check_length(path, total, frames)
            container.seek(0)
            indices = sample_indices(total, frames)
            wanted = {i: None for i in indices}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    wanted[i] = frame.to_image().convert("RGB")
                if i >= indices[-1]:
                    break
    except (av.FFmpegError, IndexError) as err:
        raise VideoError(f"{path}: cannot decode video ({err or 'no video stream'})") from None
    missing = [i for i, image in wanted.items() if image is None]
    if missing:
        raise VideoError(f"{path}: the container promised {total} frames but frame {missing[0]} did not decode")
    return [wanted[i] for i in indices]
