"""exitserve: serve multi-exit (early-exit) networks with a per-request accuracy target.

The repository keeps `models/`, `calibration/` and `service/` at its top level; they install and
import as `exitserve.models`, `exitserve.calibration` and `exitserve.service` (pyproject's
package-dir), so nothing generic like `models` lands in a user's site-packages.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("exitserve")  # the one version string lives in pyproject.toml
except PackageNotFoundError:  # a source tree used without installing it
    __version__ = "0+unknown"

__all__ = ["__version__"]
