"""Full training of one configuration: from a deployment pick to a deployable, documented model.

A search trains each candidate briefly; this package trains the chosen one with the field's usual
recipe (``Recipe``: Adam, L1, cosine, EMA 0.999 as in BasicSR / neosr), resumable checkpoints,
validation on benchmark folders, the fused deploy export, ONNX with dynamic sizes and a model
card; and evaluates any saved SR weights like a paper table. See ``docs/full_training.md``.
"""

from __future__ import annotations

from ehrsr.deploy.export import OnnxExport, export_onnx_dynamic, tiled_onnx_inference
from ehrsr.fulltrain.card import NTIRE_INPUT_SHAPE, render_card
from ehrsr.fulltrain.checkpoint import load_checkpoint
from ehrsr.fulltrain.cli import add_evaluate_parser, add_train_parser, run_evaluate, run_train
from ehrsr.fulltrain.data import ValData, parse_val_data, prepare_sets
from ehrsr.fulltrain.ema import ModelEMA
from ehrsr.fulltrain.evaluate import EvalTable, LoadedModel, evaluate_model, format_table, load_model
from ehrsr.fulltrain.loop import FullTrainResult, FullTrainSettings, full_train
from ehrsr.fulltrain.recipe import FullTrainError, Recipe
from ehrsr.fulltrain.source import ConfigSource, resolve_config

__all__ = [
    "NTIRE_INPUT_SHAPE",
    "ConfigSource",
    "EvalTable",
    "FullTrainError",
    "FullTrainResult",
    "FullTrainSettings",
    "LoadedModel",
    "ModelEMA",
    "OnnxExport",
    "Recipe",
    "ValData",
    "add_evaluate_parser",
    "add_train_parser",
    "evaluate_model",
    "export_onnx_dynamic",
    "format_table",
    "full_train",
    "load_checkpoint",
    "load_model",
    "parse_val_data",
    "prepare_sets",
    "render_card",
    "resolve_config",
    "run_evaluate",
    "run_train",
    "tiled_onnx_inference",
]
