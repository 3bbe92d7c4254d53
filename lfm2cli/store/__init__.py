"""The chat history: a SQLite database of conversations (`conversations`) and its schema migrations, in order
(`migrations`)."""
