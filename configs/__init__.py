"""Config files shipped with k2jax (installed as the package data of `k2jax.configs`).

Model presets (`kimi_k2_instruct.gin`, `kimi_k2_thinking.gin`, `kimi_k25.gin`), tiny test models
(`tiny*.gin`) and run recipes. `include 'name.gin'` in any config file finds these by name.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
