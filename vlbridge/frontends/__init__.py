"""Front-ends: how images reach the LLM. Importing this package registers the built-in ones."""

from . import llava  # noqa: F401
from .base import Frontend

__all__ = ["Frontend"]
