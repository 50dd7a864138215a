"""`make compat`: the end-to-end tests against KRaft brokers of several Kafka versions (see __main__)."""
