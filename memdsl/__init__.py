"""memdsl: a compiler from `.mem` rule files to chunkwise test-time-memorization layers."""

__version__ = "0.1.0"

from .api import CompiledRule, compile  # noqa: E402, A004
from .driver import load  # noqa: E402
from .errors import MemDSLError  # noqa: E402

__all__ = ["CompiledRule", "MemDSLError", "compile", "load"]
