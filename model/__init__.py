"""Gemma 2 / Gemma 3 text models as pure JAX functions over plain pytrees."""

from model.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from model.config import GLOBAL, PRESETS, SLIDING, GemmaConfig, config_from_hf, get_preset, load_config, tiny_config
from model.forward import forward, hidden_states, unembed
from model.lora import TARGETS, LoraConfig, abstract_adapters, init_adapters, merge, validate_lora, with_adapters
from model.params import abstract_params, init_params, param_schema
from model.sampler import SampleResult, generate
from model.think_budget import ThinkBudget, think_forcing

__all__ = [
    "GLOBAL", "PRESETS", "SLIDING", "TARGETS", "GemmaConfig", "LoraConfig", "SampleResult", "ThinkBudget",
    "abstract_adapters", "abstract_params", "config_from_hf", "forward", "generate", "get_preset", "hidden_states",
    "init_adapters", "init_params", "load_config", "load_hf_checkpoint", "merge", "param_schema",
    "save_hf_checkpoint", "think_forcing", "tiny_config", "unembed", "validate_lora", "with_adapters",
]
