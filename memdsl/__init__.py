"""memdsl: a compiler from `.mem` rule files to chunkwise test-time-memorization layers."""

from .driver import load
from .errors import MemDSLError

__all__ = ["MemDSLError", "load"]
__version__ = "0.1.0"
