import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from openjpeg.utils import encode_array
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000Lossless

from convirt import imageio
from convirt.imageio import DRAFT_MIN_SIDE, ImageDecodeError, ImageTooLargeError, load_image

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"


def test_real_jpeg_loads_as_grey(datasets):
    path = next((datasets / "covid-cxr" / "images").glob("*.jpg"))
    image = load_image(path)
    assert image.mode == "L" and min(image.size) > 32
    assert load_image(path.read_bytes()).tobytes() == image.tobytes()


def test_rgba_png_composites_on_black(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 255, 255, 0))  # fully transparent white
    path = tmp_path / "a.png"
    rgba.save(path)
    assert np.asarray(load_image(path)).max() == 0


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    ramp = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)
    grey = np.asarray(load_image(path))
    assert grey.min() == 0 and grey.max() == 255


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_real_dicom_files_decode(name):
    image = load_image(DICOM_DIR / name)
    assert image.mode == "L" and np.asarray(image).std() > 0


def test_dicom_without_extension_is_detected_by_magic(tmp_path):
    target = tmp_path / "no_suffix"
    target.write_bytes((DICOM_DIR / "CT_small.dcm").read_bytes())
    assert load_image(target).size == load_image(DICOM_DIR / "CT_small.dcm").size


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_dicom_saved_without_file_meta_decodes(tmp_path, implicit_vr):
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    expected = load_image(DICOM_DIR / "CT_small.dcm").tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()  # no transfer syntax
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(
        bare, ds, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=False
    )
    assert bare.read_bytes()[128:132] != b"DICM"
    assert load_image(bare).tobytes() == expected


def test_dicom_windowing_and_monochrome1_inversion(tmp_path):
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    raw = np.asarray(load_image(DICOM_DIR / "CT_small.dcm"), dtype=float)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "mono1.dcm"
    ds.save_as(inverted_path)
    inverted = np.asarray(load_image(inverted_path), dtype=float)
    assert np.abs(inverted - (255 - raw)).max() <= 1
    # a narrow window saturates most pixels at 0 or 255
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth = 40, 10
    windowed_path = tmp_path / "windowed.dcm"
    ds.save_as(windowed_path)
    windowed = np.asarray(load_image(windowed_path))
    assert np.isin(windowed, [0, 255]).mean() > 0.8


def test_dicom_without_pixels_is_a_clear_error():
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        load_image(DICOM_DIR / "rtplan.dcm")


def test_truncated_dicom_is_a_clear_error():
    with pytest.raises(ImageDecodeError, match="pixel data"):
        load_image(DICOM_DIR / "MR_truncated.dcm")


def test_a_corrupt_jpeg_2000_dicom_is_one_error_not_a_logged_traceback_per_plugin(caplog):
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    codestream = bytearray(encode_array(ds.pixel_array.astype(np.uint16), bits_stored=16))
    # the coding style segment (after SIZ: a broken SIZ is refused before any plugin runs)
    codestream[47:60] = b"\xff" * 13
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([bytes(codestream)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with caplog.at_level("DEBUG"), pytest.raises(ImageDecodeError, match="plugins") as failed:
        load_image(buffer.getvalue())
    assert "pillow" in str(failed.value)  # each plugin's reason is in the one error
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file")
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        load_image(path)


def test_truncated_jpeg(datasets):
    data = next((datasets / "covid-cxr" / "images").glob("*.jpg")).read_bytes()
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        load_image(data[: len(data) // 3])


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read"):
        load_image(tmp_path / "absent.png")


def test_decompression_bomb_is_refused_before_decoding():
    # a 20000 x 20000 PNG header with almost no data: refused from its size alone
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLargeError):
        load_image(buffer.getvalue())


# -- hostile input (issue 10): decoded-size budget, one frame, reduced JPEG decode, bad LUTs ------


def png_header_only(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("bit_depth", "colour_type", "too_large"),
    [(8, 0, False), (16, 0, True), (8, 2, True), (8, 6, True)],
)
def test_decoded_bytes_not_pixels_are_budgeted(bit_depth, colour_type, too_large):
    # 8000 x 8000 is under the pixel limit: 64 MB as 8-bit grey, but 128 MB as 16-bit grey,
    # 192 MB as RGB and 256 MB as RGBA, over the byte limit: refused before any decoding
    data = png_header_only(8000, 8000, bit_depth, colour_type)
    if too_large:
        with pytest.raises(ImageTooLargeError, match="bytes once decoded"):
            load_image(data)
    else:  # within the budget: decoding starts, and finds the data missing
        with pytest.raises(ImageDecodeError, match="corrupt or truncated") as raised:
            load_image(data)
        assert not isinstance(raised.value, ImageTooLargeError)


def test_dicom_bytes_are_budgeted_from_the_header():
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")  # 16-bit
    ds.Rows = ds.Columns = 8000  # 128 MB once decoded; the pixel data is not even there
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ImageTooLargeError, match="128,000,000 bytes once decoded"):
        load_image(buffer.getvalue())


def test_multi_frame_dicom_decodes_only_its_middle_frame(tmp_path):
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    frame = ds.pixel_array
    frames = np.stack([np.roll(frame, 7 * n, axis=1) for n in range(5)])
    ds.NumberOfFrames = 5
    ds.PixelData = frames.tobytes()
    path = tmp_path / "frames.dcm"
    ds.save_as(path)
    ds.NumberOfFrames = 1
    ds.PixelData = frames[2].tobytes()
    ds.save_as(tmp_path / "middle.dcm")
    assert load_image(path).tobytes() == load_image(tmp_path / "middle.dcm").tobytes()
    # compressed, frames other than the middle one are never decoded: make them garbage
    garbage = b"\xff\x4f\xff\x51" + b"\x00" * 60
    fragments = [garbage] * 5
    fragments[2] = encode_array(frames[2].astype(np.uint16), bits_stored=16)
    ds.NumberOfFrames = 5
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(tmp_path / "frames_j2k.dcm")
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate(fragments[2:3])
    ds.save_as(tmp_path / "middle_j2k.dcm")
    expected = load_image(tmp_path / "middle_j2k.dcm").tobytes()
    assert load_image(tmp_path / "frames_j2k.dcm").tobytes() == expected


def test_colour_dicom_keeps_its_size():
    ds = pydicom.dcmread(DICOM_DIR / "examples_jpeg2k.dcm")  # 3 samples, YBR_RCT
    image = load_image(DICOM_DIR / "examples_jpeg2k.dcm")
    assert image.size == (ds.Columns, ds.Rows) and np.asarray(image).std() > 0


def jpeg_of(width: int, height: int) -> bytes:
    ramp = np.add.outer(np.arange(height) % 251, np.arange(width) % 241).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_huge_jpeg_is_decoded_at_a_reduced_scale():
    image = load_image(jpeg_of(4400, 2100))
    assert image.size == (2200, 1050)  # 1/2: the shorter side stays at least DRAFT_MIN_SIDE
    assert min(image.size) >= DRAFT_MIN_SIDE
    assert image.info["source_size"] == (4400, 2100)


def test_jpeg_under_twice_the_draft_side_decodes_in_full():
    data = jpeg_of(3000, 2 * DRAFT_MIN_SIDE - 1)
    with Image.open(io.BytesIO(data)) as full:
        expected = full.convert("L").tobytes()
    assert load_image(data).tobytes() == expected


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.float64])
def test_greyscale_conversion_equals_one_float32_pass(monkeypatch, dtype):
    monkeypatch.setattr(imageio, "STRIP_PIXELS", 1000)  # many strips
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is None:
        pixels = rng.normal(0, 1000, (97, 61)).astype(dtype)
    else:
        pixels = rng.integers(info.min // 2, info.max // 2, (97, 61), dtype=dtype, endpoint=True)
    as_float = pixels.astype(np.float32)
    low, high = float(as_float.min()), float(as_float.max())
    expected = np.rint((as_float - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(imageio._array_to_grey(pixels)), expected)
    inverted = imageio._array_to_grey(pixels, lambda v: v * 3 - 1, invert=True)
    transformed = (pixels * 3 - 1).astype(np.float32)
    low, high = float(transformed.min()), float(transformed.max())
    scaled = np.rint((transformed - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(inverted), 255 - scaled)


def test_alpha_compositing_in_strips_equals_one_pass(monkeypatch):
    monkeypatch.setattr(imageio, "STRIP_PIXELS", 1000)
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 70, 4), np.uint8))
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    expected = Image.alpha_composite(background, rgba).convert("L")
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).tobytes() == expected.tobytes()


def dicom_variant(edit) -> bytes:
    ds = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def zero_window_width(ds):
    ds.WindowCenter, ds.WindowWidth = 40, 0


def text_window(ds):
    ds["WindowCenter"] = DataElement(0x00281050, "LO", "soft tissue")
    ds["WindowWidth"] = DataElement(0x00281051, "LO", "wide")


def empty_modality_lut(ds):
    ds.ModalityLUTSequence = Sequence([Dataset()])


def text_rows(ds):
    ds["Rows"] = DataElement(0x00280010, "LO", "many")


@pytest.mark.parametrize("edit", [zero_window_width, text_window, empty_modality_lut, text_rows])
def test_unusable_dicom_header_is_a_decode_error(edit):
    with pytest.raises(ImageDecodeError, match="DICOM"):
        load_image(dicom_variant(edit))
