# `make fuzz`: 1,000,000 mutated records through decode + route, each outcome judged (a request the fake APIs'
# validation accepts, or a documented dead-letter reason); a count per outcome, then crashes, unclassified errors
# and spec violations, which make it fail. About 2 minutes on one core. FUZZ_ARGS passes options, e.g.
# FUZZ_ARGS='--records 100000 --seed 7' (the seed is printed, so a run can be repeated), or
# FUZZ_ARGS='--replay .cache/fuzz/crash-1-inference-registry.bin'. The property tests (tests/unit/test_fuzz_*.py)
# are part of `make test`; this is the bulk run.

FUZZ_ARGS ?=

.PHONY: fuzz

fuzz: install ## 1,000,000 mutated records through decode + route: counts per reason, fails on any crash (~2 min)
	$(PY) -m tests.fuzz $(FUZZ_ARGS)
