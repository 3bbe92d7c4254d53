"""Text in and out of the model: tokenizer, chat templates (and their sandbox), streaming detokenizer, stop strings."""
