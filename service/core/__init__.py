"""The vocabulary every layer shares, with no I/O: errors, events, API requests and Kafka records."""
