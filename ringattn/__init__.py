"""ringattn: exact sequence-parallel attention for long-context training."""
from .layouts import layout_divisor
from .masking import document_positions
from .parallel import SequenceParallel
from .ring import ring_attention
from .sharding import positions, shard, unshard

__all__ = ["SequenceParallel", "document_positions", "layout_divisor", "positions", "ring_attention", "shard", "unshard"]
__version__ = "0.1.0"
