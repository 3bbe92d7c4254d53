"""Our PyTorch implementation of LFM2 and LFM2-MoE. Imports only torch and the config."""

from lfm2cli.model.cache import CacheSnapshot, HybridCache
from lfm2cli.model.lfm2 import Lfm2ForCausalLM

__all__ = ["CacheSnapshot", "HybridCache", "Lfm2ForCausalLM"]
