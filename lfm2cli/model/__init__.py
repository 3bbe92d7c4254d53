"""Our PyTorch implementation of LFM2 and LFM2-MoE (`lfm2.py`, `layers.py`, `moe.py`, `cache.py`) and the config it
is built from (`config.py`, read without torch, so that `info` and the CLI's checks never import it)."""
