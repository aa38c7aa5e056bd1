"""Building blocks shared by every model kind."""
from mor.layers.attention import KV, Attention, attend
from mor.layers.basic import Embed, RMSNorm, dense, param
from mor.layers.block import Block
from mor.layers.mlp import SwiGLU
from mor.layers.rope import apply_rope
