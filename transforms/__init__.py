"""Beam PTransforms and DoFns: thin shells over the keyturn core."""
