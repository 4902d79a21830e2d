"""keyturn: envelope encryption and lazy key rotation for Apache Beam (Beam-free core)."""

__all__ = ["__version__"]

# The one source of the version: pyproject.toml reads it (`version = {attr = "keyturn.__version__"}`),
# and `keyturn --version` prints it.
__version__ = "0.1.0"
