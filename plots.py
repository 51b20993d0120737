"""Charts for the training and ablation scripts, drawn with Pillow alone (no plotting dependency)."""

from pathlib import Path

from PIL import Image, ImageDraw

COLORS = [(50, 100, 235), (230, 120, 30), (40, 160, 70), (200, 50, 50), (140, 80, 190), (120, 120, 120)]


def axes(draw: ImageDraw.ImageDraw, title: str, W: int, H: int, left: int, top: int, bottom: int) -> int:
    """Title and an accuracy axis from 0 to 1 with grid lines. -> the plot's height in pixels."""
    draw.text((left, 12), title, fill="black")
    plot_h = H - top - bottom
    for tick in range(0, 11, 2):
        y = top + plot_h * (1 - tick / 10)
        draw.line([(left, y), (W - 10, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick / 10:.1f}", fill="black")
    return plot_h


def wrap(text: str, width: int) -> str:
    """Break a label into lines of at most `width` characters, at spaces (Pillow's default font is ~6 px wide)."""
    lines = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def bar_chart(rows: dict, title: str, path: Path, series=(("heldout", "held-out"), ("blind", "blind"))):
    """Grouped bars: for each variant (a row), one bar per (key, label) of `series`; default held-out vs blind."""
    W, H, left, bottom, top = 640, 360, 50, 60, 40
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    plot_h = axes(draw, title, W, H, left, top, bottom)
    colors = [(50, 100, 235), (190, 190, 190)] if len(series) == 2 else COLORS
    slot = (W - left - 10) / len(rows)
    bar = slot * 0.7 / len(series)
    for i, (name, row) in enumerate(rows.items()):
        x = left + i * slot + slot * 0.15
        for j, (key, _) in enumerate(series):
            x0, value = x + j * bar, row.get(key, 0.0)
            draw.rectangle([x0, top + plot_h * (1 - value), x0 + bar * 0.85, top + plot_h], fill=colors[j])
            if len(series) == 2:  # room for the figures
                draw.text((x0, top + plot_h * (1 - value) - 12), f"{value:.2f}", fill="black")
        draw.multiline_text((x, H - bottom + 8), wrap(name, int(slot / 6.5)), fill="black")
    x = W - 10 - sum(20 + 6 * len(label) for _, label in series)
    for j, (_, label) in enumerate(series):  # legend, top right
        draw.rectangle([x, 12, x + 10, 22], fill=colors[j])
        draw.text((x + 14, 12), label, fill="black")
        x += 20 + 6 * len(label)
    image.save(path)


def line_chart(curves: dict[str, list[tuple[int, float]]], title: str, path: Path, x_label="step"):
    """Accuracy against step, one coloured line per curve (e.g. per question category), legend at the right."""
    W, H, left, bottom, top, legend = 720, 360, 50, 40, 40, 120
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    plot_h = axes(draw, title, W - legend, H, left, top, bottom)
    x_max = max((x for points in curves.values() for x, _ in points), default=1) or 1
    plot_w = W - legend - 10 - left
    draw.text((left + plot_w - 30, H - bottom + 8), f"{x_label} {x_max}", fill="black")
    draw.text((left, H - bottom + 8), "0", fill="black")
    for i, (name, points) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        xy = [(left + plot_w * x / x_max, top + plot_h * (1 - y)) for x, y in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.rectangle([W - legend, top + 16 * i, W - legend + 10, top + 16 * i + 10], fill=color)
        draw.text((W - legend + 15, top + 16 * i), name, fill="black")
    image.save(path)
