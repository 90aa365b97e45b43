"""Compile the numba code of cbir/png.py and cbir/resample.py now, once per checkout (2 s here),
rather than inside the first command that decodes images: `make setup` runs this.

Each kind of array the decoding path hands them (grey and colour PNGs, kept grey or not) is
compiled; numba caches the code beside the modules.
"""
import io

import numpy as np
from PIL import Image

from cbir.data import decode_image
from cbir.models import Preprocess


def main() -> None:
    rng = np.random.default_rng(0)
    preprocess = Preprocess(24)
    for shape in ((30, 30), (60, 30)):  # Pillow's two orders of passes: along x first, along y first
        grey = rng.integers(0, 256, shape, dtype=np.uint8)
        for pixels in (grey, np.dstack([grey] * 3), rng.integers(0, 256, shape + (3,), dtype=np.uint8)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            for keep_grey in (True, False):
                preprocess(decode_image(buffer.getvalue(), "compile_ahead", keep_grey))


if __name__ == "__main__":
    main()
