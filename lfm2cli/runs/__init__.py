"""A generation run as text pieces: local (our model) or remote (an OpenAI-compatible server), one protocol."""
