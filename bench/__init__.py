"""`make bench`: the service measured against the limits of its own stack (see `bench.harness`)."""
