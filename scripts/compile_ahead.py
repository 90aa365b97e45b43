"""Compile the numba code of cbir/png.py and cbir/resample.py now, once per checkout (2 s here),
rather than inside the first command that decodes images: `make setup` runs this.

Each kind of PNG the decoder tells apart (grey, RGB with equal bands, colour) and both orders of
the resize's passes are run once; numba caches the code beside the modules.
"""
import io

import numpy as np
from PIL import Image

from cbir import png, resample


def main() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    for pixels in (grey, np.dstack([grey] * 3), rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        if png.decode(buffer.getvalue()) is None:
            raise SystemExit(f"cbir.png refused a plain {pixels.shape} PNG that Pillow wrote")
    for shape in ((30, 30), (60, 30)):  # Pillow's two orders of passes: along x first, along y first
        resample.resize(rng.integers(0, 256, shape, dtype=np.uint8), (24, 24))


if __name__ == "__main__":
    main()
