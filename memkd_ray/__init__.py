"""memkd-ray: MemKD anomaly detection trained for every benchmark category at once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memkd-ray")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
