"""The operator command-line tools (replay, dlq) and what they share."""
