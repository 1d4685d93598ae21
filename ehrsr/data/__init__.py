"""Data for brief training and validation: MATLAB bicubic, degradations, datasets and their cache."""

from __future__ import annotations

from ehrsr.data.datasets import (
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    IMAGE_EXTENSIONS,
    ImageReadError,
    TrainSet,
    ValItem,
    ValSet,
    default_cache_dir,
    list_images,
    prepare_data,
    read_image,
)
from ehrsr.data.degradations import degrade, degrade_base, mod_crop
from ehrsr.data.imresize import imresize
from ehrsr.data.task import TASKS, TaskConfig

__all__ = [
    "BUILTIN_TRAIN",
    "BUILTIN_VAL",
    "IMAGE_EXTENSIONS",
    "TASKS",
    "ImageReadError",
    "TaskConfig",
    "TrainSet",
    "ValItem",
    "ValSet",
    "default_cache_dir",
    "degrade",
    "degrade_base",
    "imresize",
    "list_images",
    "mod_crop",
    "prepare_data",
    "read_image",
]
