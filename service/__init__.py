"""inference-bridge: Avro events from Kafka to the Openlayer and Humanloop HTTP APIs."""

__version__ = "0.1.0"
