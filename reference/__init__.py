"""Pure-PyTorch oracles for any spec: the token-by-token recurrence and the chunkwise form."""
from .chunkwise import chunkwise
from .recurrent import recurrent

__all__ = ["recurrent", "chunkwise"]
