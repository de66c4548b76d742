"""ndtrain: distributed data-parallel training with a pure-NumPy engine and hand-written backprop.

    import ndtrain
    summary = ndtrain.train(task="xor", steps=600, out="runs/xor")   # as `ndtrain train --task xor --steps 600`
    run = ndtrain.load("runs/xor")
    run.evaluate()                                                    # {"loss": .., "accuracy": ..}

The layers are sub-packages: ndtrain.engine (layers, losses, optimizers), ndtrain.data (tokenizers, shards,
loader), ndtrain.cluster (communicators, the training loop, the coordinator), ndtrain.launch (the CLI, configs,
launchers). train / load live in ndtrain.launch.api and are imported on first use, so `import ndtrain.engine` loads
nothing of the layers above it.
"""
from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("ndtrain")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = ["train", "load", "__version__"]


def __getattr__(name: str):
    if name in ("train", "load", "Run", "TrainingFailed", "ConfigError"):
        from ndtrain.launch import api  # on first use: importing a sub-package must not load the launcher
        return getattr(api, name)
    raise AttributeError(f"module 'ndtrain' has no attribute {name!r}")
