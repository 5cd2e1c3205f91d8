"""The format's test vectors (fixtures/vectors, FORMAT.md "Test vectors"): this build reads each file to
exactly the symbols and latent stored beside it, without any network."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import pillow_sdlatent
from pillow_sdlatent.core import container, read
from tests.conftest import VECTORS

NAMES = sorted(path.stem for path in VECTORS.glob("*.sdl"))
#: name -> (version, model, coder, mode, latent shape)
EXPECTED = {
    "taesd_ctx2_rgb": ((1, 0), "taesd", "ctx2", "RGB", (4, 6, 8)),
    "taesd_ctx1_l": ((1, 0), "taesd", "ctx1", "L", (4, 6, 8)),
    "taesd_zstd_rgba": ((1, 0), "taesd", "zstd", "RGBA", (4, 4, 6)),
    "taesd_ctx2_scaled": ((2, 0), "taesd", "ctx2", "RGB", (4, 6, 8)),
    "taesd3_ctx1_rgb": ((1, 0), "taesd3", "ctx1", "RGB", (16, 6, 8)),
    "taesd3_klt_ctx1_rgb": ((1, 0), "taesd3", "ctx1", "RGB", (16, 6, 8)),
    "taesd3_klt_ctx3_rgb": ((1, 0), "taesd3", "ctx3", "RGB", (16, 6, 8)),
}


def test_every_vector_is_listed() -> None:
    assert set(NAMES) >= set(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_its_symbols_and_latent(name: str) -> None:
    data = (VECTORS / f"{name}.sdl").read_bytes()
    expected = np.load(VECTORS / f"{name}.npz")
    fp = io.BytesIO(data)
    layout = container.read_layout(fp)
    symbols = read.read_symbols(layout, container.read_payload(fp, layout))
    np.testing.assert_array_equal(symbols, expected["symbols"])
    latent = pillow_sdlatent.read_latent(data)
    assert latent.dtype == np.float32
    np.testing.assert_array_equal(latent, expected["latent"])  # bit for bit
    if name in EXPECTED:
        version, model, coder, mode, shape = EXPECTED[name]
        header = layout.header
        assert (layout.version, header.model, header.coder, header.mode, header.latent_shape) == (
            version, model, coder, mode, shape)


def test_vectors_read_without_torch() -> None:
    """The normative read path needs no deep-learning framework."""
    script = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, pillow_sdlatent, pathlib\n"
        f"folder = pathlib.Path({str(VECTORS)!r})\n"
        "for sdl in sorted(folder.glob('*.sdl')):\n"
        "    expected = np.load(sdl.with_suffix('.npz'))['latent']\n"
        "    assert (pillow_sdlatent.read_latent(sdl) == expected).all(), sdl.name\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_vectors_open_as_images() -> None:
    for name, (_, _, _, mode, _) in EXPECTED.items():
        with Image.open(VECTORS / f"{name}.sdl") as image:
            assert image.format == "SDL" and image.mode == mode
