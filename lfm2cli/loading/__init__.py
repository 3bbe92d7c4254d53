"""A checkpoint on disk into a model in memory: files and headers, loading, the description behind `info`."""
