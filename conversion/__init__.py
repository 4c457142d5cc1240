"""k2jax.conversion: Hugging Face checkpoints (bf16, FP8, INT4) in, k2jax parameters and Orbax
folders out; PEFT adapters and merged checkpoints back out.

    safetensors_io  the one safetensors reader (mapped views or pread copies) and atomic writer
    formats         FP8 block and compressed-tensors INT4 codecs, quantization_config parsing
    hf_names        HF tensor name ↔ parameter slot
    pieces          the params leaves cut into pieces and placed with their final shardings
    loader          HF folder → params: which stored tensors feed a leaf, checks, decoding
    finite          NaN / Inf counted on the devices while loading
    orbax_io        `k2jax convert`'s Orbax folders: convert_checkpoint, restore_params
    checkpoint      either kind of folder → (config, compute, params): read_checkpoint
    peft, merge     a run's LoRA out as a PEFT adapter, or folded into its base checkpoint
    peft_load       a PEFT adapter folder back in (lora.init_from, k2jax chat --adapter)

Names are imported on first use, so `import k2jax.conversion` stays light (the CLI imports it
before jax may be configured).
"""

import importlib

_EXPORTS = {
    "CheckpointError": "safetensors_io",
    "CheckpointIndex": "safetensors_io",
    "MissingTensorError": "safetensors_io",
    "SafetensorsError": "safetensors_io",
    "SafetensorsFile": "safetensors_io",
    "write_safetensors": "safetensors_io",
    "write_sharded_checkpoint": "safetensors_io",
    "QuantizationConfigError": "formats",
    "WeightFormat": "formats",
    "dequantize_fp8_block": "formats",
    "dequantize_int4": "formats",
    "int4_to_hf": "formats",
    "int4_weight_from_hf": "formats",
    "pack_int4": "formats",
    "parse_quantization": "formats",
    "unpack_int4": "formats",
    "HFCheckpoint": "loader",
    "default_experts": "loader",
    "load_params": "loader",
    "convert_checkpoint": "orbax_io",
    "is_converted": "orbax_io",
    "read_metadata": "orbax_io",
    "restore_params": "orbax_io",
    "read_checkpoint": "checkpoint",
    "AdapterError": "peft_load",
    "read_peft": "peft_load",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
