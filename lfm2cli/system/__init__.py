"""This machine: its CPU, its memory, and where lfm2 keeps files."""
