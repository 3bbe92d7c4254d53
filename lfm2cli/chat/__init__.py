"""`lfm2 chat` below the command: the session (conversation state, cache reuse, store writes), the loop and its
slash commands (`repl`), and the prompt-toolkit input (`input`)."""
