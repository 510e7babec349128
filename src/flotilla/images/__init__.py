"""Flotilla's container image: one image for the SuperLink, device and app roles."""

from flotilla.images.build import (
    DEFAULT_BASE_IMAGE,
    BuildResult,
    ImageError,
    build_image,
    default_image,
    image_exists,
    make_wheelhouse,
)

__all__ = [
    "DEFAULT_BASE_IMAGE",
    "BuildResult",
    "ImageError",
    "build_image",
    "default_image",
    "image_exists",
    "make_wheelhouse",
]
