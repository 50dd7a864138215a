"""Kafka: the consumer loop, per-partition work, offsets, the client factory and the dead-letter producer."""
