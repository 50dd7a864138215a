# `make soak`: a long drain with faults on (python -m tests.soak). 10,000,000 records (half inferences, half
# updates, one poison record in a thousand) go through the service, a child process, against a local broker and
# the fake APIs, which fail 5% of calls at random (5xx, resets, slow answers). It prints the service's peak RSS and
# the slope of its RSS per million records after the warm-up, and fails over 250 MiB or at a slope of 1 MiB per
# million. Not in CI: about 40 to 60 minutes on a 2-core machine (4,100 records/s over a 200,000-record run).
# SOAK_ARGS passes options, e.g. `make soak SOAK_ARGS="--records 200000"`.

SOAK_ARGS ?=

.PHONY: soak

soak: install kafka-jars ## 10M records drained with API faults on: peak RSS and its slope (not in CI; ~1 hour)
	$(PY) -m tests.soak $(SOAK_ARGS)
