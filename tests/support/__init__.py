"""Test support code shared by the integration tests: a real Kafka broker and helpers around it."""
