"""Decoding and preprocessing: every common image works, every bad one fails with its name."""
import cv2
import numpy as np
import pytest

from anomalygpt_edge.runtime.preprocess import ImageError, load_image, normalise, preprocess, resize

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def gradient(h=60, w=80):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)


def write(path, img):
    assert cv2.imwrite(str(path), img)
    return path


def test_channel_order_and_formats(tmp_path):
    rgb = gradient()
    bgr = rgb[..., ::-1]
    np.testing.assert_array_equal(load_image(write(tmp_path / 'a.png', bgr)), rgb)
    gray = load_image(write(tmp_path / 'g.png', rgb[..., 0]))
    assert gray.shape == (60, 80, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgba = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    np.testing.assert_array_equal(load_image(write(tmp_path / 'a4.png', rgba)), rgb)
    deep = load_image(write(tmp_path / 'd16.png', bgr.astype(np.uint16) * 257))
    np.testing.assert_array_equal(deep, rgb)
    jpg = load_image(write(tmp_path / 'a.jpg', bgr))
    assert np.abs(jpg.astype(int) - rgb).mean() < 4
    # libjpeg-turbo through simplejpeg decodes what OpenCV decodes, pixel for pixel; grey JPEGs come out RGB
    np.testing.assert_array_equal(jpg, cv2.imread(str(tmp_path / 'a.jpg'))[..., ::-1])
    grey = load_image(write(tmp_path / 'g.jpg', rgb[..., 0]))
    np.testing.assert_array_equal(grey, cv2.cvtColor(cv2.imread(str(tmp_path / 'g.jpg'), 0), cv2.COLOR_GRAY2RGB))


def damaged_mid_stream(img) -> bytes:
    """A JPEG with zeros over part of its entropy-coded data: whole in length, end marker in place."""
    data = bytearray(cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    n = len(data)
    data[n // 2:n // 2 + n // 8] = bytes(n // 8)
    return bytes(data)


@pytest.mark.parametrize('make,message', [
    (lambda p: p.write_bytes(b''), 'empty file'),
    (lambda p: p.write_text('not an image at all'), 'not a decodable image'),
    (lambda p: p.write_bytes(cv2.imencode('.png', gradient())[1].tobytes()[:300]), 'truncated PNG'),
    (lambda p: p.write_bytes(cv2.imencode('.jpg', gradient())[1].tobytes()[:400]), 'truncated JPEG'),
    (lambda p: p.write_bytes(damaged_mid_stream(np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8))),
     'damaged JPEG'),
    (lambda p: p.write_bytes(cv2.imencode('.png', np.zeros((1, 1, 3), np.uint8))[1].tobytes()), '1x1 pixels'),
])
def test_bad_files_name_the_file(tmp_path, make, message):
    p = tmp_path / 'bad.png'
    make(p)
    with pytest.raises(ImageError, match=message) as e:
        load_image(p)
    assert str(p) in str(e.value)
    assert load_image(write(tmp_path / 'good.png', gradient())).shape == (60, 80, 3)  # the next one works


def test_missing_path():
    with pytest.raises(ImageError, match='nope.png: no such file'):
        load_image('/nonexistent/nope.png')


def test_resize_modes():
    img = gradient(100, 200)
    assert resize(img, 224, 'squash').shape == (224, 224, 3)
    crop = resize(img, 224, 'center_crop')
    assert crop.shape == (224, 224, 3)
    # centre crop keeps the aspect: the crop's left column is the middle half of the scaled width
    scaled = cv2.resize(img, (448, 224), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_array_equal(crop, scaled[:, 112:336])
    with pytest.raises(ValueError, match='unknown resize mode'):
        resize(img, 224, 'stretch')


def test_normalise_layout_and_values():
    img = np.zeros((224, 224, 3), np.uint8)
    img[..., 0] = 255
    x = normalise(img, MEAN, STD)
    assert x.shape == (1, 3, 224, 224) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx((1 - MEAN[0]) / STD[0])
    assert x[0, 1, 5, 5] == pytest.approx(-MEAN[1] / STD[1])
    assert preprocess(gradient(), MEAN, STD).shape == (1, 3, 224, 224)


def test_close_to_the_reference_pillow_resize():
    """OpenCV area/cubic vs the reference's Pillow bicubic: small drift, measured here."""
    from PIL import Image
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), (0, 0), 3)
    ours = resize(img, 224, 'squash').astype(np.float32)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC), np.float32)
    assert np.abs(ours - ref).mean() < 1.5  # of 255


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    import struct
    import zlib
    png = bytearray(cv2.imencode('.png', gradient())[1].tobytes())
    png[16:24] = struct.pack('>II', 30000, 30000)  # claim 900 MP in the header
    png[29:33] = struct.pack('>I', zlib.crc32(bytes(png[12:29])))
    (tmp_path / 'bomb.png').write_bytes(bytes(png))
    with pytest.raises(ImageError, match='bomb.png: declares 30000x30000 pixels'):
        load_image(tmp_path / 'bomb.png')
    jpg = cv2.imencode('.jpg', gradient(70, 90))[1].tobytes()
    from anomalygpt_edge.runtime.preprocess import _declared_size
    assert _declared_size(jpg) == (90, 70)


def test_arrays_of_a_mono_or_16_bit_camera_become_rgb():
    from anomalygpt_edge.runtime.preprocess import to_rgb8
    rgb = gradient()
    grey = rgb[..., 0]
    expected_grey = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_array_equal(to_rgb8(grey), expected_grey)
    np.testing.assert_array_equal(to_rgb8(grey[..., None]), expected_grey)
    np.testing.assert_array_equal(to_rgb8(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])), rgb)  # RGBA
    np.testing.assert_array_equal(to_rgb8(rgb.astype(np.uint16) * 257), rgb)
    np.testing.assert_array_equal(to_rgb8(rgb[..., ::-1], bgr=True), rgb)
    for bad, message in [(np.zeros((40, 40, 2), np.uint8), r'grey \[H,W\] or colour'),
                         (np.zeros((0, 0), np.uint8), 'at least 16x16'),
                         (np.full((40, 40), np.nan, np.float32), 'not finite'),
                         (np.zeros((8, 40), np.uint8), 'at least 16x16')]:
        with pytest.raises(ImageError, match=message):
            to_rgb8(bad)
