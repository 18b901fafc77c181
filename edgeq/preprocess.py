"""Pictures to input tensors, as the manifest's Preprocess spec describes (numpy + Pillow only)."""
from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .manifest import Preprocess, TensorSpec

ImageLike = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

_RESAMPLING = getattr(Image, "Resampling", Image)
_RESAMPLE = {
    "nearest": _RESAMPLING.NEAREST,
    "bilinear": _RESAMPLING.BILINEAR,
    "bicubic": _RESAMPLING.BICUBIC,
    "lanczos": _RESAMPLING.LANCZOS,
}


def open_image(image: ImageLike) -> Image.Image:
    """Decode a path, encoded bytes, a PIL image or an HxW[xC] uint8 array, honouring EXIF orientation."""
    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise InputError(f"a picture array must be HxW, HxWx1, HxWx3 or HxWx4; got shape {image.shape}")
        if array.dtype != np.uint8:
            raise InputError(
                f"a picture array must be uint8 (0..255); got {array.dtype}. "
                "To feed prepared tensors use Predictor.run(tensors)"
            )
        return Image.fromarray(array)
    try:
        if isinstance(image, (bytes, bytearray)):
            opened = Image.open(io.BytesIO(bytes(image)))
        else:
            opened = Image.open(os.fspath(image))
        opened.load()
    except FileNotFoundError:
        raise InputError(f"{image}: no such picture file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        name = "the given bytes" if isinstance(image, (bytes, bytearray)) else str(image)
        raise InputError(f"{name} is not a readable picture ({error}); use a JPEG, PNG, BMP or similar file") from None
    return ImageOps.exif_transpose(opened)


def picture_size(spec: TensorSpec) -> tuple[int, int, int]:
    """(height, width, channels) of a picture input, from its shape and layout."""
    if spec.layout == "NCHW":
        _, channels, height, width = spec.shape
    else:
        _, height, width, channels = spec.shape
    return height, width, channels


def resize_picture(picture: Image.Image, height: int, width: int, options: Preprocess) -> Image.Image:
    """Optionally centre-crop, then resize to (height, width) with the recorded method."""
    if options.center_crop:
        side = min(picture.size) * options.center_crop
        left = (picture.width - side) / 2
        top = (picture.height - side) / 2
        picture = picture.crop((round(left), round(top), round(left + side), round(top + side)))
    if picture.size != (width, height):
        picture = picture.resize((width, height), _RESAMPLE[options.resize])
    return picture


def picture_to_tensor(image: ImageLike, spec: TensorSpec, options: Preprocess) -> np.ndarray:
    """Turn one picture into the model's input tensor (batch 1) for ``spec``."""
    height, width, channels = picture_size(spec)
    picture = open_image(image)
    picture = picture.convert("L" if options.color == "grey" else "RGB")
    picture = resize_picture(picture, height, width, options)
    pixels = np.asarray(picture, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[-1] != channels:
        raise InputError(f"the model wants {channels} channels but the pre-processing gives {pixels.shape[-1]}")
    tensor = _encode(pixels, spec, options)[None]
    if spec.layout == "NCHW":
        tensor = tensor.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tensor)


def _encode(pixels: np.ndarray, spec: TensorSpec, options: Preprocess) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if options.raw_pixels:
        if dtype == np.uint8:
            return pixels
        if dtype == np.int8:
            return (pixels.astype(np.int16) - 128).astype(np.int8)
        return pixels.astype(dtype)
    real = pixels.astype(np.float32)
    if options.standardize:
        std = max(float(real.std()), 1.0 / np.sqrt(real.size))
        real = (real - real.mean()) / std
    else:
        real = (real - np.asarray(options.mean, np.float32)) / np.asarray(options.std, np.float32)
    if dtype.kind == "f":
        return real.astype(dtype)
    return quantize(real, spec)


def quantize(real: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Quantize real values with the tensor's (per-tensor) scale and zero point, saturating."""
    if spec.quantization is None:
        raise InputError(f"input {spec.name!r} is {spec.dtype} without quantization parameters")
    dtype = np.dtype(spec.dtype)
    info = np.iinfo(dtype)
    scale = spec.quantization.scale[0]
    zero_point = spec.quantization.zero_point[0]
    q = np.round(real / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)
