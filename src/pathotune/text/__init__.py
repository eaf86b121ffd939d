"""Frozen text encoders for task-specific textual prompts."""

from .controls import UNRELATED_SENTENCES, text_encoding
from .encoders import encode_task_text, encode_texts, load_text_encoder
from .registry import TextEncoderSpec, get_text_encoder_spec, list_text_encoders, register_text_encoder

__all__ = [
    "TextEncoderSpec",
    "UNRELATED_SENTENCES",
    "encode_task_text",
    "encode_texts",
    "text_encoding",
    "get_text_encoder_spec",
    "list_text_encoders",
    "load_text_encoder",
    "register_text_encoder",
]
