"""Communicators: one interface (base.Communicator), one implementation per backend."""
from .base import Communicator
from .local import LocalCommunicator

__all__ = ["Communicator", "LocalCommunicator"]
