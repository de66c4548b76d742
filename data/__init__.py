"""ndtrain.data: tokenizers, built-in tasks, Arrow shards with a manifest, the deterministic streaming loader."""
from .info import TaskInfo

__all__ = ["TaskInfo"]
