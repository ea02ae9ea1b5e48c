"""Where a merge runs: `here` (this process), `jobs` (Hugging Face Jobs), `zerogpu` (a ZeroGPU Space).

All three take the same request (a recipe and RunOptions) and give a Handle: `run(progress)` reports the
pipeline's Events and returns an Outcome, `cancel()` stops the run and removes what it wrote.
"""

from .base import Backend, Handle, Outcome, read_outcome
from .here import Here

__all__ = ["Backend", "Handle", "Here", "Outcome", "read_outcome"]
