"""Fuzzing the bridge's record path on hostile input: decode (service/avro/codec.py and the decoders in
service/apis/) and route (service/apis/).

`rig` is what the property tests (tests/unit/test_fuzz_*.py) and the `make fuzz` driver (`python -m tests.fuzz`)
share: the codec with an in-memory schema registry, the router, the set of reasons the documentation promises,
and the fake APIs' own validation as the judge of every request. `strategies` holds the hypothesis strategies
and profiles, `mutate` the driver's fast byte-level mutators and seed records.
"""
