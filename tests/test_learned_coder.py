"""The "ctx2" learned coder: its saving over ctx1 and zstd, a frozen format, checked weights (more: test_coders.py)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pillow_sdlatent.core.coders import ZstdCoder, check_coder, ctx2
from pillow_sdlatent.core.coders.ctx1 import ContextCoder
from pillow_sdlatent.core.coders.ctx2 import LearnedContextCoder
from pillow_sdlatent.once import LoadOnce
from tests.coding import round_trip, sample_symbols

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "kodak_taesd_symbols.npz"
CODER = LearnedContextCoder("ctx2")


def test_escapes_in_a_smooth_latent_stay_cheap() -> None:
    """Three impossible values cost about 4 bytes each as escapes, plus a little around them where the
    network sees them clamped (measured: +50 bytes); the conditioning search is not thrown off."""
    fixture = np.load(FIXTURE)
    symbols = fixture["kodim22_step0.6"].astype(np.int32)
    plain = sum(map(len, round_trip(CODER, symbols)))
    symbols[1, 5, 7], symbols[3, 30, 0], symbols[0, 0, 47] = 32767, -32768, 20000
    assert sum(map(len, round_trip(CODER, symbols))) < plain + 80


def test_every_step_of_the_codec_round_trips() -> None:
    """From quality 100's step (0.03) to quality 1's (4.0), where the conditioning search ends."""
    latent = np.load(FIXTURE)["kodim04_step0.25"].astype(np.float32)[:, :24, :32] * 0.25
    for step in (0.03, 0.1, 0.38, 1.5, 4.0):
        round_trip(CODER, np.rint(latent / step).astype(np.int32))


def test_only_four_channels() -> None:
    with pytest.raises(ValueError, match="4-channel"):
        CODER.encode(np.zeros((16, 2, 3), np.int32))
    with pytest.raises(ValueError, match="4-channel"):
        check_coder("ctx2", 16)
    check_coder("ctx2", 4)


def test_kodak_latents_beat_zstd_and_ctx1() -> None:
    """Quantized TAESD latents of kodim04 and kodim22 (fixture, steps 0.25 and 0.6).

    Measured when written: 28.9% fewer bytes than zstd at step 0.6 and 23.2% at 0.25, 9.4% and 7.9%
    fewer than ctx1 (all 24 Kodak photos at the default step 0.38: 26.1% fewer than zstd). The
    floors guard against regressions.
    """
    fixture = np.load(FIXTURE)
    for step, floor in (("0.6", 0.27), ("0.25", 0.21)):
        ctx2 = ctx1 = zstd = 0
        for image in ("kodim04", "kodim22"):
            symbols = fixture[f"{image}_step{step}"].astype(np.int32)
            ctx2 += sum(map(len, round_trip(CODER, symbols)))
            ctx1 += sum(map(len, ContextCoder().encode(symbols)))
            zstd += sum(map(len, ZstdCoder().encode(symbols)))
        assert 1 - ctx2 / zstd >= floor, (step, ctx2, zstd)
        assert ctx2 < 0.95 * ctx1, (step, ctx2, ctx1)


# Frozen format: a stream written by this version must keep decoding to the same symbols, on any
# platform. The expected symbols come from integer arithmetic only.
GOLDEN_PARAMS = "0f40"
GOLDEN_PAYLOAD = (
    "f4ff2400000044e200760dfc405d00000fad26312e4d136f6c4cd0411b5fdb412539dbffb159fdff71326752f27a9b580600dc293d58"
    "0b4ca168e45e004839579649d75c86511f00e599243d00000080be40a4430244060058f1054886d1ce47fdff8f55d23a5af080711cd4"
    "005aa72300001f00105102342145f9ffc04b0880ba420c11cc010c00368008000ac052150300d72eee21f9ffe1fff627633f27edf562"
    "1a000356e07f10460000000013510d28284200003f2911a31f000811ebffe0370047f9ffedff0842334fee7ffc3e4539fffff7700f41"
    "85405e741100e627c0290000102000301546ebff14340a344039e82320a40000e0ff10d0fa29ffff0820f9080239003ae4ffe0ff1652"
    "953df50898551fc0917bee6221fbf6ff1a98cc19fa4a1200ffffd32df0a1d907ecff1100874fff7ffe2fe9799f5ee53fcc4e003d1200"
    "efffbdc1e0ef1f000c5006001740af38de4a1b000d00fd1ff8277e2f1000005100c009281cac163000285384c92d"
)


def test_frozen_stream_decodes() -> None:
    decoded = CODER.decode(bytes.fromhex(GOLDEN_PARAMS), bytes.fromhex(GOLDEN_PAYLOAD), (4, 6, 7))
    np.testing.assert_array_equal(decoded, sample_symbols(4))


def test_float32_products_only_where_provably_exact() -> None:
    """Rows whose partial sums could leave float32's exact integers take float64; both are exact."""
    rng = np.random.default_rng(0)
    weights, bias = rng.integers(-1500, 1500, (256, 16)), rng.integers(-(1 << 30), 1 << 30, 16)
    x = rng.integers(0, 1 << 16, (40, 256))
    x[:20] = rng.integers(0, 40, (20, 256))  # activations this small pass the bound
    w = weights * 2.0**-ctx2.WEIGHT_BITS
    magnitude = x @ np.abs(w).max(1)
    assert 0 < np.count_nonzero(magnitude < 2.0 ** (24 - ctx2.WEIGHT_BITS)) < len(x)
    got = ctx2._exact_affine(x.astype(np.float64), magnitude, w, w.astype(np.float32),
                                      bias * 2.0**-ctx2.WEIGHT_BITS)
    np.testing.assert_array_equal(got * 2.0**ctx2.WEIGHT_BITS, x @ weights + bias)


def test_shipped_weights_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A weights file other than the one the format was frozen with is refused, not used."""
    for network in ctx2.NETWORKS.values():
        assert hashlib.sha256(network.file.read_bytes()).hexdigest() == network.sha256
    tampered = tmp_path / "ctx2.safetensors"
    shutil.copy(ctx2.NETWORKS["ctx2"].file, tampered)
    data = bytearray(tampered.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    monkeypatch.setitem(ctx2.NETWORKS, "ctx2", replace(ctx2.NETWORKS["ctx2"], file=tampered))
    monkeypatch.setattr(ctx2, "_loaded", LoadOnce())
    with pytest.raises(OSError, match="reinstall"):
        CODER.decode(bytes.fromhex(GOLDEN_PARAMS), bytes.fromhex(GOLDEN_PAYLOAD), (4, 6, 7))


def test_decode_rejects_bad_parameters_and_shapes() -> None:
    params, payload = CODER.encode(sample_symbols(4))
    for bad_params in (params[:1] + b"\0", params[:1] + bytes([ctx2.MAX_RADIUS + 1]), params[:1]):
        with pytest.raises(ValueError):
            CODER.decode(bad_params, payload, (4, 6, 7))
    for shape in ((3, 6, 7), (16, 6, 7)):
        with pytest.raises(ValueError, match="4-channel"):
            CODER.decode(params, payload, shape)


def _decode_both(params: bytes, payload: bytes, shape: tuple[int, int, int], partial: bool = False,
                 ) -> tuple[np.ndarray | str, np.ndarray | str]:
    """What the C decoder and the numpy decoder make of a stream: the symbols, or the error's text."""
    outcomes = []
    for native in (ctx2.native, None):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ctx2, "native", native)
            try:
                outcomes.append(CODER.decode(params, payload, shape, partial))
            except ValueError as exc:
                outcomes.append(str(exc))
    return outcomes[0], outcomes[1]


def _same(a: np.ndarray | str, b: np.ndarray | str) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else np.array_equal(a, b)


NATIVE = pytest.mark.skipif(ctx2.native is None, reason="the package was built without a C compiler")
#: the C network alone, and with a second thread taking half of each wavefront (and of the encoder's symbols)
NATIVE_THREADS = pytest.mark.parametrize("threads", [1, 2])


@NATIVE
@NATIVE_THREADS
def test_native_network_gives_the_numpy_streams_and_symbols(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the network in C the encoder writes the bytes the numpy network writes, and the C loop
    decodes them to the symbols the numpy loop gives: Kodak latents at a coarse and a fine step,
    escapes at the ends of the 16-bit range, shapes of one row, one column, one symbol."""
    monkeypatch.setattr(ctx2, "NATIVE_THREADS", threads)
    fixture = np.load(FIXTURE)
    rng = np.random.default_rng(1)
    cases = [fixture["kodim22_step0.6"][:, :32, :48], fixture["kodim04_step0.25"][:, :40, :24], sample_symbols(4),
             rng.laplace(0, 3, (4, 1, 50)).round(), rng.laplace(0, 3, (4, 40, 1)).round(),
             np.array([[[5]], [[-7]], [[0]], [[32767]]]), rng.laplace(0, 200, (4, 5, 7)).round()]
    for symbols in cases:
        symbols = symbols.astype(np.int32)
        params, payload = CODER.encode(symbols)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ctx2, "native", None)
            assert CODER.encode(symbols) == (params, payload)
        native, numpy = _decode_both(params, payload, symbols.shape)
        np.testing.assert_array_equal(native, symbols)
        np.testing.assert_array_equal(numpy, symbols)


@NATIVE
@NATIVE_THREADS
def test_native_decoder_fails_and_truncates_as_the_numpy_decoder(threads: int, monkeypatch: pytest.MonkeyPatch,
                                                                   ) -> None:
    """Damaged payloads (bytes flipped) raise the same errors or decode to the same symbols; truncated
    ones decode the same prefix with ``partial`` and raise the same error without."""
    monkeypatch.setattr(ctx2, "NATIVE_THREADS", threads)
    symbols = np.load(FIXTURE)["kodim22_step0.6"].astype(np.int32)[:, :16, :24]
    symbols[2, 3, 4] = 20000  # an escape with more than 8 bits of excess
    params, payload = CODER.encode(symbols)
    rng = np.random.default_rng(2)
    outcomes = set()
    for _ in range(40):
        damaged = bytearray(payload)
        for at in rng.integers(0, len(payload), 3):
            damaged[at] ^= int(rng.integers(1, 256))
        native, numpy = _decode_both(params, bytes(damaged), symbols.shape)
        assert _same(native, numpy)
        outcomes.add(native if isinstance(native, str) else "decoded")
    assert len(outcomes) >= 2, outcomes  # the damage reached more than one kind of failure
    for cut in (0, 10, len(payload) // 3, len(payload) - 2):
        for partial in (True, False):
            native, numpy = _decode_both(params, payload[:cut], symbols.shape, partial)
            assert _same(native, numpy), (cut, partial)
        assert isinstance(native, str) and ("truncated" in native or "length" in native), native
