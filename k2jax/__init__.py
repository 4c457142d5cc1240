"""k2jax: LoRA fine-tuning of the Kimi-K2 family in JAX/XLA on an explicit device mesh.

Nothing heavy runs at import time; subpackages (k2jax.sharding, k2jax.conversion, ...) import jax
and friends when used.
"""

from k2jax.api import K2Model, load_model
from k2jax.config import ConfigError, ModelConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "K2Model", "ModelConfig", "load_model"]
