"""Token reducers: how many visual tokens the model pays for. Importing this package registers them."""

from .base import Meter, Reducer
from .spec import parse_reducer_spec

__all__ = ["Meter", "Reducer", "parse_reducer_spec"]
