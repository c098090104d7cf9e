"""Image loading of odd files and preprocessing parity with transformers' CLIP image processors."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from decoders.checkpoint import read_json
from encoders.image import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, ImageProcessor, load_image

SIZES = [(300, 400), (224, 224), (97, 500), (640, 481), (50, 60)]  # (height, width): wide, square, tall, upscaled


def _photo(h, w, seed=0):
    """Noise on a smooth gradient: exercises both the resampling filter and flat regions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * yy / max(h - 1, 1), 255 * xx / max(w - 1, 1), 128 + 0 * xx], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))


def _png_bytes(im, **kw):
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    return b.getvalue()


def _rgb(im):
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


# ---------------------------------------------------------------- preprocessing parity

@pytest.mark.parametrize("backend", ["pil", "torch"])
def test_crop_mode_matches_transformers(backend, tmp_path):
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ref_cls = CLIPImageProcessorPil if backend == "pil" else CLIPImageProcessor
    ref = ref_cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref.save_pretrained(tmp_path)
    ours = ImageProcessor.from_hf_preprocessor_config(read_json(tmp_path / "preprocessor_config.json"),
                                                      backend=backend)
    assert (ours.size, ours.crop_size, ours.resample, ours.mean) == (224, 224, "bicubic", OPENAI_CLIP_MEAN)
    images = [_photo(h, w, i) for i, (h, w) in enumerate(SIZES)]
    got = ours(images)  # one batch of differently sized images
    assert got.shape == (len(SIZES), 3, 224, 224) and got.dtype == torch.float32
    for i, im in enumerate(images):
        want = ref(im, return_tensors="pt")["pixel_values"][0]
        assert (got[i] - want).abs().max().item() < 1e-5, SIZES[i]


def test_pil_and_torch_backends_differ_slightly():
    # the reason `backend` exists: the two resizers do not agree to the last level
    im = _photo(300, 400)
    a = ImageProcessor(backend="pil")(im)
    b = ImageProcessor(backend="torch")(im)
    diff = (a - b).abs().max().item()
    assert 1e-3 < diff < 3 / 255 / min(OPENAI_CLIP_STD)


def test_crop_mode_336_from_llava_style_config():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    cfg = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True, "resample": 3,
           "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "size": 336,
           "image_processor_type": "CLIPImageProcessor", "rescale_factor": 0.00392156862745098}
    ours = ImageProcessor.from_hf_preprocessor_config(cfg)
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    im = _photo(480, 640, 3)
    assert (ours(im)[0] - ref(im, return_tensors="pt")["pixel_values"][0]).abs().max().item() < 1e-5


def test_pad_mode_is_llava_expand_to_square():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ours = ImageProcessor(size=336, crop_size=336, mode="pad")
    ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    fill = tuple(int(m * 255) for m in OPENAI_CLIP_MEAN)  # (122, 116, 104) as in LLaVA
    for h, w in [(100, 200), (201, 90), (64, 64)]:
        im = _photo(h, w, h)
        side = max(h, w)
        square = Image.new("RGB", (side, side), fill)
        square.paste(im, ((side - w) // 2, (side - h) // 2))
        got = ours(im)[0]
        assert (got - ref(square, return_tensors="pt")["pixel_values"][0]).abs().max().item() < 1e-5
    # the first rows of a wide image are pure padding: the mean colour, normalised (not exactly 0: int(m*255))
    got = ours(_photo(100, 200))[0]
    pad = (torch.tensor(fill) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert (got[:, :40, :] - pad.view(3, 1, 1)).abs().max().item() < 1e-5


def test_processor_accepts_paths_bytes_and_odd_sizes(tmp_path):
    im = _photo(50, 70)
    (tmp_path / "a.png").write_bytes(_png_bytes(im))
    proc = ImageProcessor(size=32, crop_size=32)
    x = proc([str(tmp_path / "a.png"), _png_bytes(im), im])
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    # a 1x1 image upsamples to a constant crop of its colour
    one = proc(Image.new("RGB", (1, 1), (200, 10, 90)))
    want = (torch.tensor([200, 10, 90]) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert one.shape == (1, 3, 32, 32)
    assert (one[0] - want.view(3, 1, 1)).abs().max().item() < 1e-5


def test_processor_config_round_trip_and_errors():
    p = ImageProcessor(size=336, crop_size=336, mode="pad", backend="torch")
    assert ImageProcessor.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown keys"):
        ImageProcessor.from_dict({"size": 3, "sizes": 4})
    with pytest.raises(ValueError, match="mode"):
        ImageProcessor(mode="squash")
    with pytest.raises(ValueError, match="crop_size 300 > size 224"):
        ImageProcessor(crop_size=300)
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessor.from_hf_preprocessor_config({"do_center_crop": False})
    with pytest.raises(ValueError, match="resample 1"):
        ImageProcessor.from_hf_preprocessor_config({"resample": 1})
    hf = ImageProcessor.from_hf_preprocessor_config({"size": {"shortest_edge": 256}, "crop_size": {"height": 240,
                                                     "width": 240}, "do_normalize": False, "resample": 2})
    assert (hf.size, hf.crop_size, hf.mean, hf.std, hf.resample) == (256, 240, (0, 0, 0), (1, 1, 1), "bilinear")


# ---------------------------------------------------------------- odd images

def test_grayscale_and_la(tmp_path):
    g = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    path = tmp_path / "g.png"
    Image.fromarray(g, "L").save(path)
    assert np.array_equal(_rgb(load_image(path)), np.repeat(g[..., None], 3, -1))
    # LA: alpha composited onto white
    la = Image.merge("LA", [Image.fromarray(np.full((1, 3), 100, np.uint8)),
                            Image.fromarray(np.array([[0, 255, 128]], np.uint8))])
    got = _rgb(load_image(la))[0, :, 0]
    assert got[0] == 255 and got[1] == 100 and abs(got[2] - (100 * 128 + 255 * 127) / 255) <= 1


def test_rgba_composited_on_white(tmp_path):
    a = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [10, 20, 30, 128]]], dtype=np.uint8)
    path = tmp_path / "rgba.png"
    Image.fromarray(a, "RGBA").save(path)
    got = _rgb(load_image(path))[0]
    assert got[0].tolist() == [255, 255, 255] and got[1].tolist() == [10, 20, 30]
    want = (np.array([10, 20, 30]) * 128 + 255 * 127) / 255
    assert np.abs(got[2] - want).max() <= 1


def test_palette_with_transparency(tmp_path):
    p = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0] + [0] * 759)
    path = tmp_path / "p.png"
    p.save(path, transparency=1)  # palette index 1 (blue) is transparent
    got = _rgb(load_image(path))[0]
    assert got.tolist() == [[255, 0, 0], [255, 255, 255], [0, 128, 0]]


def test_cmyk(tmp_path):
    c = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], dtype=np.uint8)
    path = tmp_path / "c.tif"
    Image.fromarray(c, "CMYK").save(path)
    assert load_image(path).mode == "RGB"
    assert _rgb(load_image(path))[0].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]


def test_16_bit_int_and_float_grayscale(tmp_path):
    v = np.array([[0, 25700, 65535, 32896]], dtype=np.uint16)  # 25700 = 100*257
    path = tmp_path / "g16.png"
    Image.fromarray(v).save(path)  # uint16 -> mode I;16
    assert Image.open(path).mode.startswith("I")
    assert _rgb(load_image(path))[0, :, 0].tolist() == [0, 100, 255, 128]
    i32 = Image.fromarray(v.astype(np.int32))
    assert i32.mode == "I"
    assert _rgb(load_image(i32))[0, :, 1].tolist() == [0, 100, 255, 128]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert f.mode == "F"
    assert _rgb(load_image(f))[0, :, 2].tolist() == [0, 128, 255]


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_48_bit_rgb_png():
    # Pillow cannot write 16-bit-per-channel RGB, so the PNG is written by hand
    v = np.array([[[0, 65535, 25700], [32896, 257, 65280]]], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in v)  # filter type 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    got = _rgb(load_image(png))
    assert np.array_equal(got, v.astype(int) >> 8)  # Pillow keeps the high byte of each sample


def test_one_pixel_image():
    im = load_image(_png_bytes(Image.new("RGB", (1, 1), (1, 2, 3))))
    assert im.size == (1, 1) and _rgb(im).tolist() == [[[1, 2, 3]]]


@pytest.mark.parametrize("orientation,rotate", [(6, lambda a: np.rot90(a, -1)), (3, lambda a: a[::-1, ::-1]),
                                                (8, lambda a: np.rot90(a, 1)), (2, lambda a: a[:, ::-1])])
def test_exif_orientation_applied(tmp_path, orientation, rotate):
    a = (np.arange(3 * 5, dtype=np.uint8).reshape(3, 5) * 17)  # every pixel distinct, 5 wide x 3 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.png"
    Image.fromarray(a, "L").save(path, exif=exif.tobytes())
    got = _rgb(load_image(path))[..., 0]
    assert np.array_equal(got, rotate(a))


def test_truncated_files(tmp_path):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt, ext in [("PNG", "png"), ("JPEG", "jpg")]:
        b = io.BytesIO()
        noise.save(b, fmt)
        path = tmp_path / f"cut.{ext}"
        path.write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
        with pytest.raises(ImageError, match=rf"cut\.{ext}: corrupt or truncated {fmt} image"):
            load_image(path)


def test_text_file_named_png_and_missing_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError, match=r"notes\.png: not an image file"):
        load_image(path)
    with pytest.raises(ImageError, match=r"nope\.jpg: no such image file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="not an image file"):
        load_image(b"")
    with pytest.raises(TypeError, match="got int"):
        load_image(3)


def _png_header_only(width, height):
    """A PNG that claims width x height pixels but holds no image data (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def test_decompression_bombs(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb\.png: 10000000000 pixels exceeds the limit of 89478485 pixels"):
        load_image(path)
    # between Pillow's limit and twice it, Pillow only warns: we refuse
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    small = _png_bytes(_photo(20, 20))
    with pytest.raises(ImageError, match=r": 400 pixels exceeds the limit of 300 pixels"):
        load_image(small)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89478485)
    with pytest.raises(ImageError, match=r"20x20 = 400 pixels exceeds the limit of 399 pixels"):
        load_image(small, max_pixels=399)
    assert load_image(small, max_pixels=400).size == (20, 20)


def test_file_object_and_bytes_inputs(tmp_path):
    im = _photo(9, 13)
    data = _png_bytes(im)
    want = _rgb(im)
    assert np.array_equal(_rgb(load_image(data)), want)
    assert np.array_equal(_rgb(load_image(bytearray(data))), want)
    assert np.array_equal(_rgb(load_image(io.BytesIO(data))), want)
