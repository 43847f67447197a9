"""Draw the course's sample images, deterministically, with PIL only (no downloads, no randomness).

    python assets/images/make_images.py      writes shapes.png, street.png, chart.png next to this file

shapes.png  224x224: coloured shapes on a plain background (the patch-explorer and attention demos)
street.png  320x224: a non-square scene (house, tree, sun, road) for non-square patch grids
chart.png   224x224: a small bar chart with text, the kind of image documents/charts VLMs read
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def shapes() -> Image.Image:
    image = Image.new("RGB", (224, 224), (236, 232, 220))
    d = ImageDraw.Draw(image)
    d.ellipse((20, 22, 92, 94), fill=(220, 40, 40))  # red circle, top left
    d.rectangle((132, 28, 200, 96), fill=(40, 90, 210))  # blue square, top right
    d.polygon([(56, 128), (18, 200), (94, 200)], fill=(30, 160, 70))  # green triangle, bottom left
    d.ellipse((136, 140, 168, 172), fill=(240, 190, 30))  # small yellow circle
    d.rectangle((172, 176, 208, 208), fill=(150, 60, 170))  # small purple square
    return image


def street() -> Image.Image:
    image = Image.new("RGB", (320, 224), (150, 200, 240))  # sky
    d = ImageDraw.Draw(image)
    d.ellipse((250, 20, 294, 64), fill=(255, 210, 60))  # sun
    d.rectangle((0, 160, 320, 224), fill=(90, 160, 80))  # grass
    d.rectangle((0, 196, 320, 224), fill=(110, 110, 115))  # road
    for x in range(8, 320, 48):
        d.rectangle((x, 208, x + 24, 211), fill=(245, 245, 245))  # lane marks
    d.rectangle((40, 100, 136, 170), fill=(200, 120, 80))  # house
    d.polygon([(30, 102), (88, 56), (146, 102)], fill=(140, 40, 40))  # roof
    d.rectangle((76, 130, 100, 170), fill=(90, 60, 40))  # door
    d.rectangle((50, 112, 70, 128), fill=(220, 240, 255))  # window
    d.rectangle((196, 118, 210, 172), fill=(110, 75, 40))  # trunk
    d.ellipse((170, 70, 236, 134), fill=(40, 120, 50))  # tree crown
    return image


def chart() -> Image.Image:
    image = Image.new("RGB", (224, 224), (255, 255, 255))
    d = ImageDraw.Draw(image)
    d.text((112, 14), "Image tokens", fill=(0, 0, 0), font=font(15), anchor="mm")
    d.line((30, 190, 210, 190), fill=(0, 0, 0), width=2)
    d.line((30, 190, 30, 36), fill=(0, 0, 0), width=2)
    # image tokens per image (tile) in the decoder, (image size / patch size)^2 / r^2 from each model's config:
    # nanoVLM (224/16)^2/2^2 = 49, Idefics3 (364/14)^2/2^2 = 169, SmolVLM-2B (384//14)^2/3^2 = 81, 256M (512/16)^2/4^2 = 64
    bars = [("49", 42, (230, 120, 40)), ("169", 145, (70, 110, 200)), ("81", 70, (60, 160, 90)), ("64", 55, (170, 70, 170))]
    for i, (label, height, colour) in enumerate(bars):
        x = 44 + i * 42
        d.rectangle((x, 190 - height, x + 28, 190), fill=colour)
        d.text((x + 14, 182 - height), label, fill=(0, 0, 0), font=font(12), anchor="mb")
    for i, name in enumerate(["nano", "Id3", "2B", "256M"]):
        d.text((58 + i * 42, 200), name, fill=(0, 0, 0), font=font(11), anchor="mt")
    return image


def main() -> None:
    for name, draw in (("shapes", shapes), ("street", street), ("chart", chart)):
        path = HERE / f"{name}.png"
        draw().save(path, optimize=True)
        print(f"wrote {path.name} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
