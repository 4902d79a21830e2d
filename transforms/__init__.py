"""Beam PTransforms and DoFns: thin shells over the keyturn core.

The public transforms, importable from here:

- `EncryptBatches`, `DecryptBatches`, `ReencryptBatches` (`keyturn.transforms.arrow`):
  Arrow batches, bare `pyarrow.Table` / `RecordBatch` or keyed
  ``(partition, RecordBatch)``, `partition_by` hive columns;
- `EncryptRecords`, `DecryptRecords`, `ReencryptRecords` (`keyturn.transforms.avro`): Avro records;
- `ReadLake`, `WriteLake` (`keyturn.transforms.lake`): keyturn lakes, committed atomically;
- `PartitionBatches`, `KeyBatches`, `AsTables` (`keyturn.transforms.partition`);
- `encrypted_schema` (`keyturn.transforms.schema`): the Arrow schema of encrypted batches.
"""

from keyturn.transforms.arrow import DecryptBatches, EncryptBatches, ReencryptBatches
from keyturn.transforms.avro import DecryptRecords, EncryptRecords, ReencryptRecords
from keyturn.transforms.lake import ReadLake, WriteLake
from keyturn.transforms.outputs import KeyturnOutputs
from keyturn.transforms.partition import AsTables, KeyBatches, PartitionBatches
from keyturn.transforms.schema import encrypted_schema

__all__ = [
    "EncryptBatches",
    "DecryptBatches",
    "ReencryptBatches",
    "EncryptRecords",
    "DecryptRecords",
    "ReencryptRecords",
    "ReadLake",
    "WriteLake",
    "KeyturnOutputs",
    "PartitionBatches",
    "KeyBatches",
    "AsTables",
    "encrypted_schema",
]
