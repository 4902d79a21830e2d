"""keyturn: envelope encryption and lazy key rotation for Apache Beam (Beam-free core)."""

__all__ = ["__version__", "native_available"]

# The one source of the version: pyproject.toml reads it (`version = {attr = "keyturn.__version__"}`),
# and `keyturn --version` prints it.
__version__ = "0.1.0"


def native_available() -> bool:
    """Whether the native column kernel (`keyturn.native`) is loaded and not turned off by ``KEYTURN_NATIVE``."""
    from keyturn.native import native_available as available

    return available()
