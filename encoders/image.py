"""Image loading (any file Pillow reads -> RGB) and CLIP/LLaVA preprocessing into a normalised pixel batch.

`load_image` makes every input an 8-bit RGB PIL image with its EXIF orientation applied, or raises `ImageError`
naming the file. `ImageProcessor` turns images into `[B, 3, H, W]` float32, matching transformers'
CLIP image processors ("crop") or LLaVA-1.5's expand-to-square ("pad").
"""
from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, io.IOBase]


class ImageError(ValueError):
    """An image that cannot be used: unreadable, corrupt, truncated, too large, or of an unsupported mode."""


def _to_uint8(a: np.ndarray, peak: float) -> np.ndarray:
    """Scale values in [0, peak] to 0..255 with rounding."""
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / peak)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, P or L with a transparent colour) is composited onto a WHITE background, as
    transformers' `convert_to_rgb` does. 16-bit grayscale (I;16*) and 32-bit integer (I) images are read as
    0..65535 (rounded to 8 bits); float (F) images as 0..1 when their maximum is <= 1, else as 0..255.
    16-bit-per-channel RGB(A) files arrive from Pillow already as 8-bit (high byte). CMYK uses Pillow's conversion.
    """
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im.convert("I") if im.mode.startswith("I;") else im)
        if im.mode == "F":
            peak = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
            a = np.nan_to_num(a)
        else:
            peak = 65535.0
        return Image.fromarray(_to_uint8(a, peak)).convert("RGB")
    try:
        if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im if im.mode == "RGB" else im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert image mode {im.mode} to RGB: {e}") from e


def load_image(image: ImageInput, max_pixels: int | None = None) -> Image.Image:
    """Open a path / bytes / file object / PIL image as an 8-bit RGB PIL image with EXIF orientation applied.

    Images over `max_pixels` (default and upper bound: Pillow's `Image.MAX_IMAGE_PIXELS`) are refused before
    decoding, as possible decompression bombs. Unreadable, corrupt or truncated data raises `ImageError`.
    """
    if isinstance(image, Image.Image):
        name, im = "<PIL image>", image
    else:
        if isinstance(image, (str, os.PathLike)):
            name = str(image)
            if not Path(image).is_file():
                raise ImageError(f"{name}: no such image file")
            try:
                fp = open(image, "rb")
            except OSError as e:
                raise ImageError(f"{name}: cannot open: {e}") from e
        elif isinstance(image, (bytes, bytearray, memoryview)):
            name, fp = f"<{len(image)} bytes>", io.BytesIO(bytes(image))
        elif hasattr(image, "read"):
            name, fp = str(getattr(image, "name", "<file object>")), image
        else:
            raise TypeError(f"load_image: expected a path, bytes, file object or PIL image, got {type(image).__name__}")
        try:
            im = _open(fp, name, max_pixels)
        finally:
            if fp is not image:
                fp.close()
    try:
        im = ImageOps.exif_transpose(im)
    except Exception as e:  # Pillow raises many types for malformed EXIF blocks
        raise ImageError(f"{name}: unreadable EXIF orientation: {e}") from e
    return to_rgb(im, name)


def _open(fp, name: str, max_pixels: int | None) -> Image.Image:
    """Identify, check the size, then decode; every failure becomes an ImageError naming the file."""
    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse there too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            # Pillow's message quotes twice the limit for errors; say the pixel count and the limit itself
            n = re.search(r"\((\d+) pixels\)", str(e))
            raise ImageError(f"{name}: {n.group(1) if n else 'too many'} pixels exceeds the limit of "
                             f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS; possible decompression "
                             f"bomb)") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not an image file (Pillow cannot identify its format)") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: corrupt image header: {e}") from e
    w, h = im.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels "
                         f"(possible decompression bomb)")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: corrupt or truncated {im.format} image: {e}") from e
    return im


_PIL_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                 "bicubic": Image.Resampling.BICUBIC}
_HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL codes stored in preprocessor_config.json


@dataclass
class ImageProcessor:
    """Images -> normalised pixels [B, 3, crop, crop].

    mode "crop": resize the shortest edge to `size` then center-crop `crop_size` (transformers' CLIPImageProcessor).
    mode "pad": first expand to a square filled with the mean colour (LLaVA-1.5 `image_aspect_ratio="pad"`).
    backend "pil": resize with Pillow, as transformers 4.x `CLIPImageProcessor` did when LLaVA / CLIP were trained
    (and v5's `CLIPImageProcessorPil`); "torch": torchvision's uint8 antialiased resize, as transformers 5's default
    `CLIPImageProcessor`. The two differ by up to ~2/255 per pixel.
    """

    size: int = 224
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    mode: str = "crop"
    rescale_factor: float = 1 / 255
    backend: str = "pil"

    def __post_init__(self):
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"ImageProcessor.mode must be 'crop' or 'pad', got {self.mode!r}")
        if self.backend not in ("pil", "torch"):
            raise ValueError(f"ImageProcessor.backend must be 'pil' or 'torch', got {self.backend!r}")
        if self.resample not in _PIL_RESAMPLE:
            raise ValueError(f"ImageProcessor.resample must be one of {sorted(_PIL_RESAMPLE)}, got {self.resample!r}")
        if self.crop_size > self.size:
            raise ValueError(f"ImageProcessor: crop_size {self.crop_size} > size {self.size} would need padding")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageProcessor: mean and std need 3 values, got {self.mean}, {self.std}")

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessor":
        """Inverse of `to_dict`; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"ImageProcessor: unknown keys {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_preprocessor_config(cls, d: dict, mode: str = "crop", backend: str = "pil") -> "ImageProcessor":
        """From an HF `preprocessor_config.json` dict (CLIPImageProcessor fields; missing ones take its defaults).

        `mode` is not stored there: LLaVA keeps `image_aspect_ratio` ("pad") in its model config.
        """
        def side(v, key):
            if isinstance(v, int):
                return v
            if key in v:
                return v[key]
            if "height" in v and v["height"] == v.get("width"):
                return v["height"]
            raise ValueError(f"preprocessor config: unsupported {key.split('_')[0]} {v} (need a square or shortest_edge)")

        for flag in ("do_resize", "do_center_crop"):
            if not d.get(flag, True):
                raise ValueError(f"preprocessor config: {flag}=false is not supported")
        resample = d.get("resample", 3)
        if resample not in _HF_RESAMPLE:
            raise ValueError(f"preprocessor config: resample {resample} is not supported (0, 2, 3)")
        do_norm = d.get("do_normalize", True)
        return cls(
            size=side(d.get("size", 224), "shortest_edge"),
            crop_size=side(d.get("crop_size", 224), "crop_size"),
            mean=tuple(d.get("image_mean", OPENAI_CLIP_MEAN)) if do_norm else (0.0, 0.0, 0.0),
            std=tuple(d.get("image_std", OPENAI_CLIP_STD)) if do_norm else (1.0, 1.0, 1.0),
            resample=_HF_RESAMPLE[resample],
            mode=mode,
            rescale_factor=d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0,
            backend=backend,
        )

    def expand_to_square(self, im: Image.Image) -> Image.Image:
        """Pad to a square with the mean colour, image centred (LLaVA's `expand2square`)."""
        w, h = im.size
        if w == h:
            return im
        fill = tuple(int(m * 255) for m in self.mean)
        out = Image.new(im.mode, (max(w, h), max(w, h)), fill)
        out.paste(im, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
        return out

    def resize_crop(self, im: Image.Image) -> torch.Tensor:
        """Shortest edge to `size`, then the central `crop_size` square: uint8 [3, crop, crop]."""
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)  # truncation, as transformers does
        nh, nw = (new_long, self.size) if w <= h else (self.size, new_long)
        if self.backend == "pil":
            x = torch.from_numpy(np.array(im.resize((nw, nh), _PIL_RESAMPLE[self.resample]))).permute(2, 0, 1)
        else:
            from torchvision.transforms.v2 import InterpolationMode
            from torchvision.transforms.v2.functional import resize

            modes = {"nearest": InterpolationMode.NEAREST_EXACT, "bilinear": InterpolationMode.BILINEAR,
                     "bicubic": InterpolationMode.BICUBIC}
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # [3, H, W] uint8
            x = resize(x, [nh, nw], interpolation=modes[self.resample], antialias=True)
        c = self.crop_size
        top, left = (nh - c) // 2, (nw - c) // 2
        return x[:, top:top + c, left:left + c]

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """One image or a list (paths, bytes, PIL images) -> float32 pixels [B, 3, crop, crop]."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        crops = []
        for image in images:
            im = load_image(image)
            if self.mode == "pad":
                im = self.expand_to_square(im)
            crops.append(self.resize_crop(im))
        x = torch.stack(crops).float()  # [B, 3, c, c]
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return x.mul_(self.rescale_factor).sub_(mean).div_(std)
