"""HTTP delivery: the client protocol and its three clients, classification, limits, breaker and batching."""
