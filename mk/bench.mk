# `make bench`: throughput, latency hiding, latency and memory of the service on one core, against a
# local broker and a minimal HTTP sink on the other core (bench/harness.py explains the phases).
# It prints a table, the tracing cost (`tracing_cost updates off=... on=... share=...`: row updates
# with tracing on at 100% sampling, exporting to a real OTLP receiver, against the same untraced;
# pass when both the wall and the per-CPU-second shares are within 0.15; about 40 s of the run,
# `--skip row_updates_traced` leaves it out) and, as its last line, one JSON
# object. BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS="--quick"` or
# `BENCH_ARGS="--profile .cache/bench/prof"`.
.PHONY: bench

bench: install kafka-jars ## the benchmark: a table, then one JSON line of figures (~5 min)
	$(PY) -m bench $(BENCH_ARGS)
