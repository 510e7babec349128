"""Flotilla's container image: one image for the SuperLink, device and app roles."""

from flotilla.images.appdeps import check_image_has_app, unmet_requirements
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
    "check_image_has_app",
    "default_image",
    "image_exists",
    "make_wheelhouse",
    "unmet_requirements",
]
