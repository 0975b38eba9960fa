"""Backends answer eval prompts: a checkpoint in-process (`ModelBackend`) or any OpenAI-compatible
endpoint (`EndpointBackend`), behind one interface (`Backend.generate`)."""

from .base import Backend, Request
from .endpoint import EndpointBackend, EndpointError
from .model import ModelBackend

__all__ = ["Backend", "EndpointBackend", "EndpointError", "ModelBackend", "Request"]
