"""medpipe.imaging against independent formulas (numpy, pydicom's reference LUT code) and real sample files."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_windowing

import fixtures_adversarial as fa
from medpipe import imaging
from medpipe.config import load_config
from medpipe.errors import RejectedInput

CONFIG = load_config("config/brain_mri.yaml", ["image.size=64"])
DICOM = fa.SAMPLE_DICOM


def config(*overrides: str):
    return load_config("config/brain_mri.yaml", ["image.size=64", *overrides])


def reference_window_dataset(center: float, width: float, function: str | None = None) -> pydicom.Dataset:
    """A dataset whose windowing output range is exactly 0..255 (8-bit unsigned), for pydicom's apply_windowing."""
    ds = pydicom.Dataset()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsStored, ds.PixelRepresentation = 8, 0
    ds.WindowCenter, ds.WindowWidth = center, width
    if function:
        ds.VOILUTFunction = function
    return ds


# ----------------------------------------------------------------------------------------------------------------
# grey-level arithmetic
@pytest.mark.parametrize("center,width", [(40.0, 80.0), (100.0, 50.0), (-600.0, 1500.0), (0.5, 1.0)])
@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_windows_match_pydicom_reference(center, width, function):
    values = np.linspace(-2000, 2000, 4001)
    ours = imaging.WINDOW_FUNCTIONS[function](values, center, width)
    reference = apply_windowing(values, reference_window_dataset(center, width, function))
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_linear_window_against_ps33_piecewise_formula():
    center, width = 40.0, 80.0
    x = np.arange(-100, 200, dtype=np.float64)
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    expected = np.where(x <= low, 0.0, np.where(x > high, 255.0, ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0))
    np.testing.assert_allclose(imaging.linear_window(x, center, width), expected, atol=1e-9)


def test_robust_window_against_numpy_percentiles():
    rng = np.random.default_rng(0)
    values = rng.normal(1000, 300, size=(64, 48))
    values[0, 0] = 1e6  # an outlier the robust window must ignore
    low, high = np.percentile(values, 1), np.percentile(values, 99)
    expected = np.clip(np.rint((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(imaging.robust_window(values, 1, 99), expected)
    assert imaging.robust_window(np.full((8, 8), 5.0), 1, 99).max() == 0  # flat image: no division by zero


def test_rgb_to_grey_is_bt601_luma():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    expected = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    assert np.abs(imaging.rgb_to_grey(rgb).astype(float) - expected).max() <= 1.0


def test_alpha_is_composited_on_black():
    grey = np.full((4, 4), 200, dtype=np.uint8)
    alpha = np.array([[0, 255, 128, 64]] * 4, dtype=np.uint8)
    out = imaging.composite_on_black(grey, alpha)
    np.testing.assert_array_equal(out[0], np.rint(200 * alpha[0].astype(float) / 255).astype(np.uint8))


def test_pad_to_square_centres_on_black_and_keeps_aspect():
    image = np.full((10, 4, 1), 9, dtype=np.uint8)
    padded = imaging.pad_to_square(image)
    assert padded.shape == (10, 10, 1)
    assert (padded[:, 3:7] == 9).all() and (padded[:, :3] == 0).all() and (padded[:, 7:] == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# DICOM grey pipeline on real objects
def test_ct_grey_pipeline_matches_rescale_then_header_window():
    path = DICOM / "CT-MONO2-16-brain.dcm"
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # independent modality LUT
    expected = imaging.to_uint8(apply_windowing(hu, reference_window_dataset(float(ds.WindowCenter),
                                                                              float(ds.WindowWidth))))
    image, decoded = imaging.decode_dicom(path.read_bytes(), CONFIG)
    np.testing.assert_array_equal(image, expected)
    assert decoded.format == "dicom" and decoded.mode == "MONOCHROME2" and (decoded.width, decoded.height) == (512, 512)


def test_configured_window_overrides_the_header():
    path = DICOM / "CT-MONO2-16-brain.dcm"
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    image, _ = imaging.decode_dicom(path.read_bytes(), config("dicom.window={center: 400, width: 1800}"))
    np.testing.assert_array_equal(image, imaging.to_uint8(apply_windowing(hu, reference_window_dataset(400, 1800))))


def test_percentiles_when_no_window_exists():
    path = DICOM / "JPEG-LL.dcm"  # no Window Center/Width, no VOI LUT
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    low, high = np.percentile(values, CONFIG.dicom.voi_percentiles)
    expected = np.clip(np.rint((values - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    image, _ = imaging.decode_dicom(path.read_bytes(), CONFIG)
    np.testing.assert_array_equal(image, expected)


def test_monochrome1_is_inverted_after_voi():
    path = DICOM / "CR-MONO1-10-chest.dcm"  # no preamble, no file meta: transfer syntax is inferred
    ds = pydicom.dcmread(path, force=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.file_meta.get("TransferSyntaxUID") is None
    assert raw  # the file really lacks the transfer syntax
    image, decoded = imaging.decode_dicom(path.read_bytes(), CONFIG)
    imaging._assume_transfer_syntax(ds)
    values = ds.pixel_array.astype(np.float64)
    windowed = imaging.to_uint8(apply_windowing(values, reference_window_dataset(float(ds.WindowCenter),
                                                                                 float(ds.WindowWidth))))
    np.testing.assert_array_equal(image, 255 - windowed)
    # bright means dense: the lowest stored value (densest in MONOCHROME1) ends up brightest
    assert image.flat[np.argmin(values)] >= image.flat[np.argmax(values)]
    assert decoded.mode == "MONOCHROME1"


@pytest.mark.parametrize("rule", ["middle", "max"])
def test_multiframe_rule(rule):
    path = DICOM / "MR-MONO2-8-16x-heart.dcm"
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.astype(np.float64)
    assert frames.shape[0] == 16
    chosen = frames[8] if rule == "middle" else frames.max(axis=0)
    low, high = np.percentile(chosen, CONFIG.dicom.voi_percentiles)
    expected = np.clip(np.rint((chosen - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    image, decoded = imaging.decode_dicom(path.read_bytes(), config(f"dicom.multiframe={rule}"))
    np.testing.assert_array_equal(image, expected)
    assert decoded.frames == 16


def test_voi_lut_sequence_is_applied():
    path = DICOM / "vlut_04.dcm"
    ds = pydicom.dcmread(path)
    item = ds.VOILUTSequence[0]
    lut = np.asarray(item.LUTData)
    entries, first = item.LUTDescriptor[0] or 65536, item.LUTDescriptor[1]
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)
    mapped = lut[index].astype(np.float64)
    expected = np.clip(np.rint((mapped - lut.min()) * 255.0 / (lut.max() - lut.min())), 0, 255).astype(np.uint8)
    image, _ = imaging.decode_dicom(path.read_bytes(), CONFIG)
    np.testing.assert_array_equal(image, expected)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "US-PAL-8-10x-echo.dcm"])
def test_colour_dicom_is_converted_explicitly(name):
    prepared = imaging.preprocess_bytes((DICOM / name).read_bytes(), CONFIG)
    assert prepared.pixels.shape == (64, 64, 1) and prepared.pixels.dtype == np.uint8
    assert prepared.pixels.max() > 0
    colour = imaging.preprocess_bytes((DICOM / name).read_bytes(), config("image.channels=3"))
    assert colour.pixels.shape == (64, 64, 3)


def test_dicom_without_pixels_and_broken_ones_are_rejected():
    with pytest.raises(RejectedInput) as info:
        imaging.preprocess_bytes((DICOM / "2.25.304589190180579357564631626197663875025.dcm").read_bytes(), CONFIG)
    assert info.value.reason == "no_pixel_data"
    for name in ("emri_small_jpeg_2k_lossless_too_short.dcm", "liver_deflate.dcm"):
        with pytest.raises(RejectedInput) as info:
            imaging.preprocess_bytes((DICOM / name).read_bytes(), CONFIG)
        assert info.value.reason in ("truncated", "corrupt")


def test_dicom_budget_is_checked_from_the_header():
    with pytest.raises(RejectedInput) as info:
        imaging.preprocess_bytes((DICOM / "MR-MONO2-8-16x-heart.dcm").read_bytes(), config("ingest.max_pixels=1000000"))
    assert info.value.reason == "pixel_budget"  # 16 x 256 x 256 = 1,048,576 > 1,000,000


# ----------------------------------------------------------------------------------------------------------------
# PNG / JPEG / TIFF
def test_16bit_tiff_first_page_robust_min_max(tmp_path):
    rng = np.random.default_rng(2)
    page0 = rng.integers(1000, 40000, size=(60, 80)).astype(np.uint16)
    page1 = np.full((60, 80), 65535, dtype=np.uint16)
    path = fa.tiff_16bit(tmp_path / "scan.tif", [page0, page1])
    image, decoded = imaging.decode_raster(path.read_bytes(), CONFIG)
    low, high = np.percentile(page0.astype(np.float64), CONFIG.dicom.voi_percentiles)
    expected = np.clip(np.rint((page0 - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)
    assert decoded.format == "tiff" and decoded.frames == 2


def test_16bit_png(tmp_path):
    ramp = np.tile(np.arange(0, 64 * 1000, 1000, dtype=np.uint16), (40, 1))
    image, decoded = imaging.decode_raster(fa.png_16bit(tmp_path / "ramp.png", ramp).read_bytes(), CONFIG)
    assert decoded.format == "png" and image.dtype == np.uint8
    assert image[0, 0] == 0 and image[0, -1] == 255 and (np.diff(image[0].astype(int)) >= 0).all()


def test_palette_with_transparency(tmp_path):
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.info["transparency"] = 1
    data = fa.pil_bytes(palette, "PNG", transparency=1)
    image, decoded = imaging.decode_raster(data, CONFIG)
    assert decoded.mode == "P" and image.max() == 0  # white but fully transparent -> black


def test_preprocess_shape_png_roundtrip_and_padding():
    source = fa.sample_jpegs("notumor", 25)
    wide = next(p for p in source if Image.open(p).size[0] != Image.open(p).size[1])
    prepared = imaging.preprocess_file(wide, CONFIG)
    assert prepared.pixels.shape == (64, 64, 1) and prepared.pixels.dtype == np.uint8
    decoded_png = np.asarray(Image.open(io.BytesIO(prepared.png)))
    assert Image.open(io.BytesIO(prepared.png)).mode == "L"
    np.testing.assert_array_equal(decoded_png, prepared.pixels[..., 0])


def test_extension_is_not_trusted(tmp_path):
    jpeg = fa.sample_jpegs("glioma", 1)[0]
    prepared = imaging.preprocess_file(fa.jpeg_named_png(jpeg, tmp_path / "really_a.png"), CONFIG)
    assert prepared.decoded.format == "jpeg"


def test_pixel_hash_follows_pixels_not_bytes():
    image = Image.open(fa.sample_jpegs("glioma", 1)[0]).convert("L")
    fast, small = fa.pil_bytes(image, "PNG", compress_level=1), fa.pil_bytes(image, "PNG", compress_level=9)
    assert fast != small
    assert imaging.preprocess_bytes(fast, CONFIG).pixel_hash == imaging.preprocess_bytes(small, CONFIG).pixel_hash


# ----------------------------------------------------------------------------------------------------------------
# adversarial inputs
@pytest.mark.parametrize(
    "build,reason",
    [
        (lambda d: fa.truncated_jpeg(fa.sample_jpegs("glioma", 1)[0], d / "cut.jpg"), "truncated"),
        (lambda d: fa.zero_bytes(d / "empty.png"), "empty"),
        (lambda d: fa.text_named_dcm(d / "notes.dcm"), "not_image"),
        (lambda d: fa.large_png(d / "big.png", 1000, 1000), "pixel_budget"),
        (lambda d: fa.png_bomb_header(d / "bomb.png"), "pixel_budget"),
        (lambda d: fa.tiny_png(d / "tiny.png"), "too_small"),
    ],
    ids=["truncated-jpeg", "zero-bytes", "text-named-dcm", "png-over-budget", "png-bomb-header", "too-small"],
)
def test_adversarial_files_are_rejected_with_a_reason(tmp_path, build, reason):
    path = build(tmp_path)
    with pytest.raises(RejectedInput) as info:
        imaging.preprocess_file(path, config("ingest.max_pixels=600000"))
    assert info.value.reason == reason


def test_file_size_limit():
    with pytest.raises(RejectedInput) as info:
        imaging.check_file_size(3 * 2**20, max_file_mb=2)
    assert info.value.reason == "pixel_budget"


# ----------------------------------------------------------------------------------------------------------------
# the per-image fast path (issue 21) against the pre-issue code, pinned in tests/preprocess_reference.py
def _same_as_reference(data: bytes, cfg) -> None:
    import preprocess_reference

    png, pixels, digest = preprocess_reference.preprocess_bytes(data, cfg)
    prepared = imaging.preprocess_bytes(data, cfg)
    assert prepared.pixel_hash == digest  # the duplicate and split key: unchanged
    np.testing.assert_array_equal(prepared.pixels, pixels)
    assert prepared.pixels.shape == pixels.shape and prepared.pixels.dtype == np.uint8
    # the PNG encoder changed (png_bytes, Up filter): other bytes, the same pixels
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(prepared.png))),
                                  np.asarray(Image.open(io.BytesIO(png))))


@pytest.mark.parametrize("shape", [(160, 160), (128, 128, 3), (1, 7), (5, 1, 3), (33, 17)])
def test_png_bytes_decode_to_the_same_pixels_in_pillow_and_tensorflow(shape):
    import tensorflow as tf

    rng = np.random.default_rng(sum(shape))
    for pixels in (rng.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 255, np.uint8),
                   np.zeros(shape, np.uint8), (np.arange(np.prod(shape)) % 256).astype(np.uint8).reshape(shape)):
        png = imaging.png_bytes(pixels)
        with Image.open(io.BytesIO(png)) as decoded:
            decoded.load()  # Pillow checks every chunk's CRC
            assert decoded.mode == ("L" if pixels.ndim == 2 else "RGB")
            np.testing.assert_array_equal(np.asarray(decoded), pixels)
        from_tf = tf.io.decode_png(png, channels=0).numpy()
        np.testing.assert_array_equal(from_tf, pixels if pixels.ndim == 3 else pixels[..., None])


def test_png_bytes_is_about_as_small_as_pillows_level_1_on_real_slices():
    """ISA-L's level 1 trades at most a few percent of size for ~5x the speed of zlib (medpipe.imaging)."""
    sizes = []
    for path in fa.sample_jpegs("glioma", 4):
        pixels = imaging.preprocess_file(path, CONFIG).pixels[..., 0]
        pillow = fa.pil_bytes(Image.fromarray(pixels), "PNG", compress_level=1)
        sizes.append((len(imaging.png_bytes(pixels)), len(pillow)))
    assert sum(ours for ours, _ in sizes) < 1.05 * sum(pillow for _, pillow in sizes)


def _mode_variants(tmp_path) -> list[bytes]:
    """Every Pillow mode branch of pil_to_image, square and not (padding), small and large (draft, reduce)."""
    base = Image.open(fa.sample_jpegs("glioma", 1)[0]).convert("RGB").resize((300, 220))
    palette = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    rgba = base.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    la = base.convert("L")
    la.putalpha(128)
    ramp = (np.arange(220 * 300, dtype=np.uint32).reshape(220, 300) % 60000).astype(np.uint16)
    return [
        fa.pil_bytes(base, "PNG"), fa.pil_bytes(base, "JPEG", quality=90), fa.pil_bytes(base.convert("L"), "PNG"),
        fa.pil_bytes(base.resize((900, 700)), "JPEG"), fa.pil_bytes(base.convert("L").resize((700, 900)), "JPEG"),
        fa.pil_bytes(palette, "PNG"), fa.pil_bytes(transparent, "PNG", transparency=3), fa.pil_bytes(rgba, "PNG"),
        fa.pil_bytes(la, "PNG"), fa.pil_bytes(base.convert("1"), "PNG"), fa.pil_bytes(base.convert("CMYK"), "JPEG"),
        fa.pil_bytes(base, "TIFF"), fa.png_16bit(tmp_path / "ramp.png", ramp).read_bytes(),
        fa.tiff_16bit(tmp_path / "ramp.tif", [ramp, ramp[::-1]]).read_bytes(),
    ]


@pytest.mark.parametrize("size,channels", [(64, 1), (128, 1), (160, 1), (160, 3)])
def test_fast_path_matches_the_reference_on_the_sample(tmp_path, size, channels):
    cfg = config(f"image.size={size}", f"image.channels={channels}")
    files = sorted(p for p in fa.SAMPLE.glob("*/*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".dcm"))
    decodable = 0
    for path in files:
        data = path.read_bytes()
        try:
            _same_as_reference(data, cfg)
            decodable += 1
        except RejectedInput:
            with pytest.raises(RejectedInput):  # rejected by the new path too, for the same reason
                imaging.preprocess_bytes(data, cfg)
    for data in _mode_variants(tmp_path):
        _same_as_reference(data, cfg)
    assert decodable >= 100 + 5  # the brain MRI sample, chest X-rays and the decodable DICOMs


@pytest.mark.shared_data
@pytest.mark.parametrize("size", [128, 160])
def test_fast_path_matches_the_reference_on_a_slice_of_the_shared_set(size):
    from conftest import SHARED_DATA

    files = sorted((SHARED_DATA / "brain-tumor-mri" / "Training").glob("*/*"))
    if not files:
        pytest.skip("no shared brain MRI set")
    cfg = config(f"image.size={size}")
    for path in files[::19]:  # ~300 files: every class, size and mode (L, RGB, RGBA, P) of the set
        _same_as_reference(path.read_bytes(), cfg)
