"""keyturn: envelope encryption and lazy key rotation for Apache Beam (Beam-free core)."""
