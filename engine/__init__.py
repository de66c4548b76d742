"""ndtrain.engine: layers with forward and hand-written backward over one flat parameter buffer."""
from .module import Module, ModuleList, Sequential
from .params import Param, ParamStore

__all__ = ["Module", "ModuleList", "Sequential", "Param", "ParamStore"]
