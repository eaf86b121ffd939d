"""Frozen text encoders for task-specific textual prompts."""

from .encoders import encode_task_text, load_text_encoder
from .registry import TextEncoderSpec, get_text_encoder_spec, list_text_encoders, register_text_encoder

__all__ = [
    "TextEncoderSpec",
    "encode_task_text",
    "get_text_encoder_spec",
    "list_text_encoders",
    "load_text_encoder",
    "register_text_encoder",
]
