# Fault suite: kill -9, broker restart, HTTP faults, a 60 s outage, poison, rebalance and per-key ordering, each
# against the real local broker, the fake APIs and the service as child processes; one result line per scenario
# (stdout), notes and problems on stderr, exit 1 if any scenario fails. About 20 minutes on a 2-core machine.
# CHAOS_ARGS passes options through, e.g. CHAOS_ARGS='--scenario kill9 --records 30000 --seed 7'.

CHAOS_ARGS ?=

.PHONY: chaos

chaos: install kafka-jars ## fault scenarios (kill -9, broker restart, HTTP faults, outage, poison, rebalance, ordering)
	$(PY) -m tests.chaos $(CHAOS_ARGS)
