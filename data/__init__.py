"""ndtrain.data: tokenizers, built-in tasks, Arrow shards with a manifest, the deterministic streaming loader.

    info, columns = generate("reverse", 10_000, seed=0)          # in memory
    ds = open_dataset(prepare("reverse", "shards/reverse"), expect=model_info)   # or from validated shards
    loader = Loader(ds, global_batch_size=64, rank=r, world_size=W, seed=0)
"""
from .dataset import Dataset, as_dataset, from_columns
from .info import BOS, EOS, PAD, UNK, TaskInfo
from .loader import Loader
from .prepare import ensure_prepared, prepare
from .reader import open_dataset
from .shards import DataError, write_dataset
from .tasks import TASKS, generate

__all__ = ["TaskInfo", "PAD", "UNK", "BOS", "EOS", "TASKS", "generate", "Dataset", "as_dataset", "from_columns",
           "Loader", "prepare", "ensure_prepared", "open_dataset", "write_dataset", "DataError"]
