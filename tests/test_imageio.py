import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from convirt.imageio import ImageDecodeError, ImageTooLargeError, load_image

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
