"""Checkpoint layouts other than vlbridge's own: detected on load, written by `vlbridge export --format`."""

from ..registry import CHECKPOINT_FORMATS
from . import llava_hf, llava_original

CHECKPOINT_FORMATS.register("llava-hf")(llava_hf)
CHECKPOINT_FORMATS.register("llava-original")(llava_original)
