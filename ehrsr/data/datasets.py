"""Training and validation data, re-exported under their historical module name.

The code lives in one module per concern: :mod:`ehrsr.data.io` (reading images, folders, the
built-in sample images), :mod:`ehrsr.data.bank` (flat image storage and patch cropping),
:mod:`ehrsr.data.trainset`, :mod:`ehrsr.data.valset`, :mod:`ehrsr.data.cache` (the disk cache)
and :mod:`ehrsr.data.prepare` (preparing a task's sets through the cache).
"""

from __future__ import annotations

from ehrsr.data.cache import DATA_FORMAT_VERSION, default_cache_dir
from ehrsr.data.io import (
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_images,
    read_image,
)
from ehrsr.data.prepare import prepare_data
from ehrsr.data.trainset import TrainSet
from ehrsr.data.valset import ValItem, ValSet

__all__ = [
    "BUILTIN_TRAIN",
    "BUILTIN_VAL",
    "DATA_FORMAT_VERSION",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "TrainSet",
    "ValItem",
    "ValSet",
    "default_cache_dir",
    "list_images",
    "prepare_data",
    "read_image",
]
