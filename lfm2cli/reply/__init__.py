"""What a reply holds beyond text: its reasoning block, its tool calls, and the user's functions that answer them."""
