"""Public output tags shared by every keyturn transform."""

MAIN = "main"
VERSION_MISMATCH = "version_mismatch"
QUARANTINE = "quarantine"
AUDIT = "audit"

SIDE_OUTPUTS = (VERSION_MISMATCH, QUARANTINE, AUDIT)
