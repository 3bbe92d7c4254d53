"""Choosing tokens: the prefill/decode loop, sampling, constrained decoding, the prefix cache."""
