"""`python -m service dlq`: read a dead-letter topic and summarise or list its letters."""
