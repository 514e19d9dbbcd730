from .mla import MLA, PagedAttention
from .moe import MoE, RouterOutput
from .transformer import Block, Transformer, build_model

__all__ = ["MLA", "MoE", "Block", "Transformer", "PagedAttention", "RouterOutput", "build_model"]
