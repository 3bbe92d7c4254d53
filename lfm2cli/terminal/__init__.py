"""What the user sees: rendered replies, progress bars, numbers as people read them, safe text, guarded stdout."""
