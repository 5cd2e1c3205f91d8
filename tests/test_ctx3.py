"""The "ctx3" learned coder for 16-channel taesd3 latents: its saving over ctx1, a frozen format, C and numpy alike.

ctx3 is ctx2's arithmetic with another network (FORMAT.md "Coders ctx2 and ctx3"), so the arithmetic's
own edge cases are in test_learned_coder.py; these tests pin what the second network changes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pillow_sdlatent import pipeline
from pillow_sdlatent.core import quantize
from pillow_sdlatent.core.coders import check_coder, ctx2
from pillow_sdlatent.core.coders.ctx1 import ContextCoder
from pillow_sdlatent.core.coders.ctx2 import LearnedContextCoder
from tests.coding import round_trip, sample_symbols

CODER = LearnedContextCoder("ctx3")


@pytest.fixture(scope="module")
def taesd3_latent(photo: Image.Image) -> np.ndarray:
    from pillow_sdlatent.models import load_model

    return load_model("taesd3").encode_image(pipeline.padded_rgb(photo))


def test_photo_latents_take_fewer_bytes_than_ctx1(taesd3_latent: np.ndarray) -> None:
    """The codec's klt symbols of a real photo (192x128 crop of kodim23) at a coarse and a fine step.

    Measured when written: 40.9% fewer bytes than ctx1 at step 0.9 (370 against 626) and 23.4% at 0.3
    (1,208 against 1,577); on a small image ctx1's fitted parameters weigh more than on whole photos
    (held-out photos: training/README.md). The floors guard against regressions."""
    for step, floor in ((0.9, 0.35), (0.3, 0.2)):
        symbols = quantize.quantizer_for("taesd3", step, 16).quantize(taesd3_latent)
        ctx3 = sum(map(len, round_trip(CODER, symbols)))
        ctx1 = sum(map(len, ContextCoder().encode(symbols)))
        assert 1 - ctx3 / ctx1 >= floor, (step, ctx3, ctx1)


def test_only_sixteen_channels() -> None:
    with pytest.raises(ValueError, match="16-channel"):
        CODER.encode(np.zeros((4, 2, 3), np.int32))
    with pytest.raises(ValueError, match="16-channel"):
        check_coder("ctx3", 4)
    check_coder("ctx3", 16)


# Frozen format: a stream written by this version must keep decoding to the same symbols, on any platform.
GOLDEN_PARAMS = "0f40"
GOLDEN_PAYLOAD = (
    "ffff970b0000803a3ad00f00e973184f0180ae4e4ba5075abf361f001400fdc33153969ffe4e0480e0501a00454cf47fe090e7a48044"
    "00000969f34f98318fba48a89bb133a782a7a8b794bd85a28b3bc7a51f00e4c34f1e2c910743fffff0940308aaae4f3030a263ae0000"
    "807106d474670998e0fffc5113af0d80fe4be5561a00e04bc03600360000e0ff1a4d16272b51e853e13fe38cfc551f001100ebaefe49"
    "7b400f001f00ee46fef912450f005251170015cf644f0100b22b0900d8abfd379a071632e1ff7138b23ab100e0ff5a770af0293e0a41"
    "c047ef39a244f8ff0e000130aa357e4d0680e833d4c80e18e54c4721ff74aecfebff30650040e749ff7fed3b17591b9df64c1b0072a5"
    "3b301266e879fc3be0ffe7ff00d69c5af545e5815429060004f5e53ed008e61f1b004122113c1400fb7aa089d14477e728a03a1c0b00"
    "986561e1874765e4e8ffefa82c3a1e005ff40c002a3791317f38e3fff439e0ff6a310700121dc028c1af649d1f00e4c781421a00404f"
    "b03379d1e0ff00001b3806040048c828dc39ecff1b00abc99eb10900e4ff8d2377501f00f48b3f1affff8c744e3c05003f4b0200ad31"
    "7bf2f26bf233e0ff1f300600300b0300ea2f032812ab2541668e0b46ff46e8ac1200eb2f2b9b702a00000972e12f99332923f2ff6ec9"
    "40098e49fbfff3ff456b3696a8cc0d006a2e997b000016acf5484f1cf833d7240130211e3042e0ff0b201f8bf5381800cf3d05a03a32"
    "bc21e0ffe03b19a80746403ef1ffcc3b1228e0ff5f4507340100e6491f80ea27013af4213b13a2c3993417391a00ec83f7f71db20500"
    "1e3e703165ff1f00f5a7862cd331ffff1f00e4f99140f88fa219ff089a857f390300ec49904100003f3b0f28fef1cc3de0ff4b3a1c72"
    "1f008e4c1000972be2b5a939ffff1ec5e157eeca3d3001113d20c142f0ff717900001252183fec501f3c14518445feff9fb7eeff1f00"
    "ba46f43dcf6650320000ffff1457ef350d3e171aa03b0700edff19284b3e1f00024b7d11fd23362ddd1a4d4be16420325336633a5e47"
    "ffff09818e4a12000043050053d5ffb3a724cc3f00000b5ecf23f4392f560e00e0ffd746e5ff09fab3428f281f000000ec3b403c07ae"
    "000010bbbc1eb049e0ff738304080f185dd35b252bd5efc9af8a000006cc434b941281b23d2ae5ffbb784a171f00893aa55be0871f3e"
    "e5ff8f3f80801a470a27a75014005036403e00000000162d8c2e0479b47cad37c18e3b1313804ee5f9ff185c58f6dea6017cc83d1900"
    "f22e0a00f63304b6ffffe337e0ffce3f0b0012f8c525983bf1a20a004b3b5440080041432619e6ff1f000d30e010ec4f1d00f529401b"
    "1b5a3a28d9510900715bd327e2fff8ff92c6ea961a430800350d0d00f83d2f52ed3d081ae0ffe5ff00087822fc47d846e0ff0ed0efff"
    "9640b8d25f390400eb33dc10712a170062dee4ff09466f2634691f00f9ade71f7a2a6a9d952a57710000034b0b3a354f7edea35f8031"
    "e0ff1f98f53d261e4524dbd70400f027046700440000c4740e6ec038e0ff40410ce00000084d6b380c5aecce0339fbff0600978d5bd5"
    "d4a7e9ff09ae262ee6b7a5759349010040745626b3578042e0ff1068fcff0318113c8a18363df0ffd6560660db30803f1200bf121018"
    "fbff1a501134ec4bef198e2e1f64000007111c20989c2118bb71f0ff4c2f46219578343e0b00f93c0500c328bd83fffff9b7fdff1528"
    "b426d2f9c031e0ff080ee4ff573dfbffbc431f009658e0ffefcb0e30142e1c4d006454e5aa40e5ff4c2d01009c196c7e45193e44eb85"
    "4f9a"
)


def test_frozen_stream_decodes() -> None:
    decoded = CODER.decode(bytes.fromhex(GOLDEN_PARAMS), bytes.fromhex(GOLDEN_PAYLOAD), (16, 6, 7))
    np.testing.assert_array_equal(decoded, sample_symbols(16))


@pytest.mark.skipif(ctx2.native is None, reason="the package was built without a C compiler")
@pytest.mark.parametrize("threads", [1, 2])
def test_native_network_gives_the_numpy_streams_and_symbols(threads: int, taesd3_latent: np.ndarray,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Channels from 3 on read the windows of channels 0-2, not of the three before them: the C
    network and loop agree with the numpy ones on every channel of a photo's latent and on escapes."""
    monkeypatch.setattr(ctx2, "NATIVE_THREADS", threads)
    photo_symbols = quantize.quantizer_for("taesd3", 0.5, 16).quantize(taesd3_latent)
    for symbols in (photo_symbols, sample_symbols(16)):
        params, payload = CODER.encode(symbols)
        decoded = CODER.decode(params, payload, symbols.shape)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ctx2, "native", None)
            assert CODER.encode(symbols) == (params, payload)
            np.testing.assert_array_equal(CODER.decode(params, payload, symbols.shape), symbols)
        np.testing.assert_array_equal(decoded, symbols)
