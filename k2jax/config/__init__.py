"""k2jax.config: typed configuration — the model's architecture and the config files of a run.

    model.py   `ModelConfig`, the architecture, read from a checkpoint's own config.json or from a
               preset (`load_model_config("kimi_k2_thinking.gin")`); `ARCHITECTURE_KEYS`, the
               fields that fix every weight's shape.
    files.py   the config-file loader: gin syntax bound to one frozen dataclass per section
               (`load_config`, `read_bindings`, `bind_sections`, `to_gin`), with file, line and
               key in every error.
    checks.py  `ConfigError` and `check_field_types`, the type check every config dataclass runs
               in `__post_init__`.

They import in that order (checks ← files ← model) and nothing else of k2jax but the packaged
config folder (k2jax.configs), so every other package can depend on this one. The other sections'
dataclasses (`LoraConfig`, `OptimConfig`, `RunConfig`, ...) live beside the code they configure;
this package only checks and binds them.

Everything public is re-exported here: `from k2jax.config import ModelConfig, load_config`.
"""

from k2jax.config.checks import ConfigError, check_field_types
from k2jax.config.files import (
    CONFIG_DIR,
    bind_sections,
    did_you_mean,
    find_config_file,
    load_config,
    parse_bindings,
    parse_override,
    read_bindings,
    to_gin,
)
from k2jax.config.model import (
    ARCHITECTURE_KEYS,
    ModelConfig,
    load_model_config,
    read_hf_config,
    yarn_mscale,
)

__all__ = [
    "ARCHITECTURE_KEYS",
    "CONFIG_DIR",
    "ConfigError",
    "ModelConfig",
    "bind_sections",
    "check_field_types",
    "did_you_mean",
    "find_config_file",
    "load_config",
    "load_model_config",
    "parse_bindings",
    "parse_override",
    "read_bindings",
    "read_hf_config",
    "to_gin",
    "yarn_mscale",
]
