"""The fault suite (`make chaos`): scenarios that break the broker, the APIs and the service itself while the real
service runs as child processes, then account for every produced record. `python -m tests.chaos` runs them;
`tests/integration/test_chaos_fast.py` runs small versions inside `make test`."""
