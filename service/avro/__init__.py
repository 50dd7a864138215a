"""Avro: schemas, the Confluent schema registry, and decoding record values."""
