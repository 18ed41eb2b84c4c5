"""Backends run the exported graphs; search algorithms above them are shared (``runtime.search``)."""

from cbart.runtime.backends.base import Backend, EncodedBatch

__all__ = ["Backend", "EncodedBatch"]
