"""ringattn: exact sequence-parallel attention for long-context training."""
from .allgather import allgather_attention
from .decode import decode_attention
from .diagnostics import AttentionMass, attention_mass
from .hybrid import hybrid_attention
from .layouts import layout_divisor, layout_needs_documents
from .masking import document_positions
from .mesh import init_mesh
from .parallel import SequenceParallel
from .rangemask import RangeMask
from .ring import ring_attention
from .sharding import positions, shard, unshard
from .ulysses import ulysses_attention

__all__ = ["AttentionMass", "RangeMask", "allgather_attention", "SequenceParallel", "attention_mass", "decode_attention", "document_positions", "hybrid_attention", "init_mesh",
           "layout_divisor", "layout_needs_documents", "positions", "ring_attention", "shard", "unshard", "ulysses_attention"]
__version__ = "0.1.0"
