"""Running the service: metrics, health, logging, redaction and the event-loop runtime."""
