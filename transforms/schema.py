"""`encrypted_schema`: the Arrow schema of encrypted batches, for writers that need it up front.

`beam.io.WriteToParquetBatched(path, schema=...)` must know its schema when
the pipeline is built, before any batch is encrypted. `encrypted_schema`
derives it from the plain schema without a KMS, with the same code that
restores encrypted schemas from a dataset contract
(`keyturn.arrow_codec.contract_schema`): each encrypted column becomes a
nullable ``binary`` column carrying keyturn's field metadata, and the key
columns ``_keyturn_version`` (int64) and ``_keyturn_dek``
(dictionary<int32, binary>) are appended. That is the schema of
`EncryptBatches(..., output="tables")` output (give the same schema as its
`output_schema` to fix the column order when `partition_by` columns are
put back). The Avro twin is `keyturn.avro_codec.derive_encrypted_schema`
(and `EncryptRecords(...).encrypted_schema`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN, contract_schema
from keyturn.contract import arrow_contract

__all__ = ["encrypted_schema"]

_KEY_FIELDS = (pa.field(VERSION_COLUMN, pa.int64()), pa.field(DEK_COLUMN, pa.dictionary(pa.int32(), pa.binary())))


def encrypted_schema(plain_schema: pa.Schema, columns: Sequence[str], *, bind_columns: Sequence[str] = ()) -> pa.Schema:
    """The schema `columns` of `plain_schema` encrypt to (bound to `bind_columns`); no KMS, no registry.

    `ContractError` if a column is not in the schema; `ValueError` if the
    schema already has a key column (it is encrypted already).
    """
    for f in _KEY_FIELDS:
        if f.name in plain_schema.names:
            raise ValueError(f"the schema already has the reserved column {f.name!r}: is it encrypted already?")
    # the contract a first write would pin, for a placeholder dataset name: contract_schema reads only its
    # columns' plain fields and bindings, none of which depend on the dataset
    contract = arrow_contract("encrypted-schema", plain_schema, list(columns), bind=list(bind_columns))
    with_keys = pa.schema(list(plain_schema) + list(_KEY_FIELDS), metadata=plain_schema.metadata)
    return contract_schema(with_keys, contract)
