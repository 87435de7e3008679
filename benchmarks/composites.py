"""Promptable-segmentation data made here from real photographs: objects cut from photos by
random shapes (ellipses, polygons, smooth blobs) and pasted, possibly overlapping, onto other
photos, with their exact masks, in SA-1B's layout (sa_N.jpg + sa_N.json, COCO RLE).

    python benchmarks/composites.py OUT --split heldout --count 24 --seed 1

The photos of the `train` split come from scikit-image's data module and scikit-learn's sample
images (`pip install -e '.[test]'` installs both); the `heldout` split is made only of the
repository's examples/ photos, none of which the train split uses. Licences: docs/trained.md.
Each composite is a function of (seed, index) alone, so a split is the same bytes on every run
and `composite(rng, ...)` can make training data on the fly.

A mask is what is visible of its object: the parts that later objects cover are not in it, and
an object with less than MIN_VISIBLE of the image visible is left out of the annotations.
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

import eval as ev

ROOT = Path(__file__).resolve().parent.parent

# (package, file in its data folder): licence as its docstring or README states it
TRAIN_PHOTOS = {
    ("skimage", "data/camera.png"): "CC0 (Lav Varshney)",
    ("skimage", "data/coins.png"): "no known copyright restrictions (Brooklyn Museum)",
    ("skimage", "data/brick.png"): "CC0 (CC0Textures)",
    ("skimage", "data/grass.png"): "CC0 (DeviantArt, linolafett)",
    ("skimage", "data/gravel.png"): "CC0 (CC0Textures)",
    ("skimage", "data/hubble_deep_field.jpg"): "public domain (NASA)",
    ("skimage", "data/retina.jpg"): "CC0 (Mikael Haggstrom)",
    ("skimage", "data/ihc.png"): "no known copyright restrictions (CMMI)",
    ("sklearn", "datasets/images/china.jpg"): "CC BY 2.0 (danielbuechele, Flickr)",
    ("sklearn", "datasets/images/flower.jpg"): "CC BY 2.0 (vultilion, Flickr)",
}
HELDOUT_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]  # examples/
SIZE = 128  # side of a composite, pixels
MAX_OBJECTS = 4
MIN_VISIBLE = 0.01  # fraction of the image an object must show to be annotated


def package_file(package: str, file: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"error: the train photos need the {package} package: pip install -e '.[test]'"
        )
    return Path(spec.submodule_search_locations[0]) / file


def load_photos(split: str) -> List[Image.Image]:
    """The photos of `split` ("train" or "heldout"), each an RGB image in memory."""
    if split == "train":
        paths = [package_file(package, file) for package, file in TRAIN_PHOTOS]
    else:
        paths = [ROOT / "examples" / name for name in HELDOUT_PHOTOS]
    photos = []
    for path in paths:
        with Image.open(path) as im:
            photos.append(im.convert("RGB"))
    return photos


def crop(rng: np.random.Generator, photo: Image.Image, size: int) -> np.ndarray:
    """A random square crop of 30-100% of the photo's short side, resized to (size, size, 3)
    uint8 (cropped by PIL: Image.fromarray of a numpy slice copies the slice first)."""
    w, h = photo.size
    side = int(rng.uniform(0.3, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = photo.crop((x, y, x + side, y + side))
    return np.array(patch.resize((size, size), Image.BILINEAR))


def random_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool: an ellipse, a star-shaped polygon or a smooth blob, of radius 8-30%
    of the side, centred anywhere in the middle 70% of the image."""
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    radius = rng.uniform(0.08, 0.3) * size
    kind = rng.integers(3)
    if kind == 1:  # polygon: 3-8 vertices at sorted angles, radii 50-100% of `radius`
        n = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = radius * rng.uniform(0.5, 1.0, n)
        canvas = Image.new("1", (size, size))
        points = list(zip(cx + r * np.cos(angles), cy + r * np.sin(angles)))
        ImageDraw.Draw(canvas).polygon(points, fill=1)
        return np.array(canvas, dtype=bool)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if kind == 0:  # ellipse with axes radius x (0.4-1), rotated
        theta, squash = rng.uniform(0, np.pi), rng.uniform(0.4, 1.0)
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        return (u / radius) ** 2 + (v / (radius * squash)) ** 2 <= 1
    # blob: a radius that varies smoothly with the angle, four harmonics
    phi = np.arctan2(dy, dx)
    k = np.arange(1, 5)[:, None, None]
    amplitude = rng.uniform(-0.25, 0.25, 4)[:, None, None] / k
    phase = rng.uniform(0, 2 * np.pi, 4)[:, None, None]
    edge = radius * (1 + (amplitude * np.cos(k * phi + phase)).sum(0))
    return np.hypot(dy, dx) <= edge


def composite(rng: np.random.Generator, photos: List[Image.Image], size: int = SIZE):
    """One composite: ((size, size, 3) uint8 image, [(size, size) bool visible mask, ...]),
    largest first. The background is a crop of one photo, each of 1-MAX_OBJECTS objects a crop
    of another photo cut by a random shape; later objects cover earlier ones."""
    order = rng.permutation(len(photos))
    image = crop(rng, photos[order[0]], size)
    shapes = []
    for i in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        texture = crop(rng, photos[order[1 + i % (len(photos) - 1)]], size)
        shape = random_shape(rng, size)
        image[shape] = texture[shape]
        shapes.append(shape)
    visible = []
    for i, shape in enumerate(shapes):
        covered = np.any(shapes[i + 1 :], axis=0) if i + 1 < len(shapes) else False
        visible.append(shape & ~covered)
    masks = [m for m in visible if m.mean() >= MIN_VISIBLE]
    return image, sorted(masks, key=lambda m: -int(m.sum()))


def annotations(masks: List[np.ndarray]) -> Dict:
    """SA-1B's JSON for one image: an annotation per mask, COCO RLE and bbox."""
    return {
        "annotations": [
            {
                "id": i,
                "segmentation": ev.encode_rle(m),
                "bbox": list(ev.mask_bbox(m)),
                "area": int(m.sum()),
            }
            for i, m in enumerate(masks)
        ]
    }


def composite_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def write_split(folder: Path, split: str, count: int, seed: int, size: int = SIZE) -> List[Path]:
    """Writes composites 1..count of `split` as folder/sa_N.jpg (quality 95, as SA-1B's are
    JPEG) + sa_N.json; the masks are those of the composite before JPEG coding. Returns the
    image paths. An image is written only if missing (the bytes would be the same)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos, paths = load_photos(split), []
    for n in range(1, count + 1):
        path = folder / f"sa_{n}.jpg"
        if not path.is_file() or not path.with_suffix(".json").is_file():
            image, masks = composite(composite_rng(seed, n), photos, size)
            Image.fromarray(image).save(path, quality=95)
            path.with_suffix(".json").write_text(json.dumps(annotations(masks)))
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="composites.py", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder to write sa_N.jpg + sa_N.json into")
    p.add_argument("--split", choices=("train", "heldout"), default="heldout")
    p.add_argument("--count", type=int, default=24, help="composites (%(default)s)")
    p.add_argument("--seed", type=int, default=1, help="(%(default)s)")
    p.add_argument("--size", type=int, default=SIZE, help="side in pixels (%(default)s)")
    args = p.parse_args(argv)
    paths = write_split(args.out, args.split, args.count, args.seed, args.size)
    print(f"{len(paths)} composites of the {args.split} photos in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
