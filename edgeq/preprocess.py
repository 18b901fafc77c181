"""Pictures to input tensors, as the manifest's Preprocess spec describes (numpy + Pillow only)."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
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


@dataclass(frozen=True)
class InputMapping:
    """Where the original picture lies in the model input: ``original = input * scale + offset``.

    Input coordinates are continuous pixel coordinates of the model input (0..width); the
    mapping undoes centre-crop, resizing and letterbox padding exactly.
    """

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    input_size: tuple[int, int]  # (width, height) of the model input
    image_size: tuple[int, int]  # (width, height) of the original picture

    def to_original(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points in input pixels -> points in original pixels."""
        return np.asarray(xs) * self.scale_x + self.offset_x, np.asarray(ys) * self.scale_y + self.offset_y

    def normalized_to_original(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Points normalised to the input (0..1) -> points in original pixels."""
        return self.to_original(np.asarray(xs) * self.input_size[0], np.asarray(ys) * self.input_size[1])


def fit_picture(picture: Image.Image, height: int, width: int, options: Preprocess) -> tuple[Image.Image, InputMapping]:
    """Centre-crop, resize (or letterbox) to (height, width); returns the picture and its mapping."""
    image_size = picture.size
    left = top = 0.0
    if options.center_crop:
        side = min(picture.size) * options.center_crop
        x0, y0 = (picture.width - side) / 2, (picture.height - side) / 2
        box = (round(x0), round(y0), round(x0 + side), round(y0 + side))
        left, top = float(box[0]), float(box[1])
        picture = picture.crop(box)
    source_w, source_h = picture.size
    if options.letterbox:
        ratio = min(width / source_w, height / source_h)
        new_w = min(width, max(1, round(source_w * ratio)))
        new_h = min(height, max(1, round(source_h * ratio)))
        pad_x, pad_y = (width - new_w) // 2, (height - new_h) // 2
        if (new_w, new_h) != picture.size:
            picture = picture.resize((new_w, new_h), _RESAMPLE[options.resize])
        fill = options.letterbox_fill if picture.mode == "L" else (options.letterbox_fill,) * len(picture.getbands())
        canvas = Image.new(picture.mode, (width, height), fill)
        canvas.paste(picture, (pad_x, pad_y))
        sx, sy = source_w / new_w, source_h / new_h
        mapping = InputMapping(sx, sy, left - pad_x * sx, top - pad_y * sy, (width, height), image_size)
        return canvas, mapping
    if picture.size != (width, height):
        picture = picture.resize((width, height), _RESAMPLE[options.resize])
    mapping = InputMapping(source_w / width, source_h / height, left, top, (width, height), image_size)
    return picture, mapping


def resize_picture(picture: Image.Image, height: int, width: int, options: Preprocess) -> Image.Image:
    """Optionally centre-crop, then resize (or letterbox) to (height, width) with the recorded method."""
    return fit_picture(picture, height, width, options)[0]


def picture_to_tensor(image: ImageLike, spec: TensorSpec, options: Preprocess) -> np.ndarray:
    """Turn one picture into the model's input tensor (batch 1) for ``spec``."""
    return picture_to_tensor_mapped(image, spec, options)[0]


def picture_to_tensor_mapped(image: ImageLike, spec: TensorSpec, options: Preprocess) -> tuple[np.ndarray, InputMapping]:
    """The input tensor for one picture and how input coordinates map back to the picture."""
    height, width, channels = picture_size(spec)
    picture = open_image(image)
    picture = picture.convert("L" if options.color == "grey" else "RGB")
    picture, mapping = fit_picture(picture, height, width, options)
    pixels = np.asarray(picture, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    elif options.color == "bgr":  # OpenCV's channel order (e.g. PaddleClas models)
        pixels = pixels[..., ::-1]
    if pixels.shape[-1] != channels:
        raise InputError(f"the model wants {channels} channels but the pre-processing gives {pixels.shape[-1]}")
    tensor = _encode(pixels, spec, options)[None]
    if spec.layout == "NCHW":
        tensor = tensor.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(tensor), mapping


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
