# Fault suite: kill -9, broker restart, HTTP faults, a 60 s outage, poison, rebalance, per-key ordering, and the
# measured ones: 5% of calls hanging 30 s (hangs), a token bucket per API (rate-limit), a revoked key replaced in
# its key file (auth-revoked), update ids not found for 20 s (not-yet), API latency 0 -> 200 ms -> 0 -> 50 ms
# (latency-step), and 20% mixed faults with 3 kill -9 and a 30 s outage (mixed). Each runs against the real local
# broker, the fake APIs and the service as child processes on its default delivery settings; one result line per
# scenario (stdout) with its figures and targets, notes and problems on stderr, exit 1 if any scenario fails.
# About 11 minutes on the 2-core machine when the service meets its targets (a whole run took 10 min on
# 2026-11-29); a service that misses them makes the measured scenarios wait out their bounds, up to about 30 min.
# CHAOS_ARGS passes options through, e.g. CHAOS_ARGS='--scenario kill9 --records 30000 --seed 7'.

CHAOS_ARGS ?=

.PHONY: chaos

chaos: install kafka-jars ## fault scenarios (kill -9, broker restart, HTTP faults, outage, poison, rebalance, ordering, hangs, rate limit, key rotation, not-yet, latency, mixed)
	$(PY) -m tests.chaos $(CHAOS_ARGS)
