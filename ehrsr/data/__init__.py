"""Data for brief training and validation: MATLAB bicubic, degradations, datasets and their cache."""

from __future__ import annotations

from ehrsr.data.cache import default_cache_dir
from ehrsr.data.degradations import degrade, degrade_base, mod_crop
from ehrsr.data.imresize import imresize
from ehrsr.data.io import (
    BUILTIN_TRAIN,
    BUILTIN_VAL,
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_images,
    read_image,
)
from ehrsr.data.prepare import prepare_data
from ehrsr.data.task import TASKS, TaskConfig
from ehrsr.data.trainset import TrainSet
from ehrsr.data.valset import ValItem, ValSet

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
