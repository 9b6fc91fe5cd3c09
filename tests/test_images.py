"""load_image: every bad-data case and every colour mode a dataset may hold."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from mllm.data.errors import BadRecordError
from mllm.data.images import load_image


def _load(ref):
    return load_image(ref, record_id="rec-7", source="train.json#7")


def _reason(ref) -> BadRecordError:
    with pytest.raises(BadRecordError) as info:
        _load(ref)
    return info.value


def test_missing_file_names_record_source_and_path(tmp_path):
    path = tmp_path / "nope.png"
    err = _reason(str(path))
    assert err.reason == "missing_image"
    assert "rec-7" in str(err) and "train.json#7" in str(err) and str(path) in str(err)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_unreadable_and_global_flag_untouched(tmp_path, fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    err = _reason(str(path))
    assert err.reason == "unreadable_image" and str(path) in str(err)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before is False


def test_garbage_bytes_are_unreadable(tmp_path):
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    err = _reason(str(path))
    assert err.reason == "unreadable_image" and "rec-7" in str(err)


def test_zero_size_image():
    assert _reason(Image.new("RGB", (0, 5))).reason == "zero_size_image"


def test_rgb_file_is_fully_loaded_and_unchanged(tmp_path):
    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    img = _load(str(path))
    assert img.mode == "RGB" and img.size == (6, 4)
    path.unlink()  # pixels must already be in memory
    np.testing.assert_array_equal(np.asarray(img), arr)


def test_grey_l_becomes_rgb(tmp_path):
    path = tmp_path / "l.png"
    Image.new("L", (3, 3), 77).save(path)
    assert _load(str(path)).getpixel((1, 1)) == (77, 77, 77)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    img.putpixel((1, 0), (255, 0, 0, 255))  # opaque red stays red
    path = tmp_path / "a.png"
    img.convert(mode).save(path)
    out = _load(str(path))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == ((255, 0, 0) if mode == "RGBA" else (76, 76, 76))


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = _load(str(path))
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 200, 10)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)
    r, g, b = _load(str(path)).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # pure red


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535, 32896]], dtype=np.uint16)).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(_load(str(path)))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 255, 128])


@pytest.mark.parametrize(
    "mode,values,expected", [("I", [0, 255, 100], [0, 255, 100]), ("F", [0.0, 1.0, 0.5], [0, 255, 128])]
)
def test_32_bit_grey_in_memory(mode, values, expected):
    dtype = np.int32 if mode == "I" else np.float32
    img = Image.fromarray(np.array([values], dtype=dtype))
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(_load(img))[0, :, 0], expected)


def test_embedded_pil_image_is_not_mutated():
    src = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    out = _load(src)
    assert out.getpixel((0, 0)) == (255, 255, 255) and src.mode == "RGBA"
