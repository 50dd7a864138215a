"""inference-bridge: Avro events from Kafka to the Openlayer and Humanloop HTTP APIs."""

from importlib.metadata import PackageNotFoundError, version

# One source: pyproject.toml's [project] version, read back from the installed distribution's metadata (`make
# install` installs the package editable, the image installs its wheel). tests/unit/test_version.py checks that
# the chart's appVersion and the Dockerfile's label default say the same.
try:
    __version__ = version("inference-bridge")
except PackageNotFoundError:  # a source tree put on sys.path without installing it
    __version__ = "0+unknown"
