"""AWS backends through boto3: KMS, a DynamoDB key registry, CloudWatch Logs audit.

- `AwsKms` (`keyturn.aws.kms`): the `KmsBackend` over AWS KMS.
- `DynamoDbKeyRegistry`, `create_table` (`keyturn.aws.dynamodb_registry`):
  the `KeyRegistry` with conditional transactional writes.
- `CloudWatchAuditSink` (`keyturn.aws.cloudwatch_sink`): audit events to
  CloudWatch Logs.
- `AwsKeySource` (`keyturn.aws.keysource`): the picklable recipe a Beam
  DoFn opens in ``setup()``.

`keyturn.keysource.key_source_from_config` picks a local or AWS key source
from the YAML config. The client-side KMS rate limit (`TokenBucket`) is in
`keyturn.kms.decorators`, shared with the local backend. docs/AWS.md
covers IAM, real-AWS use and moto.
"""

from keyturn.aws.cloudwatch_sink import CloudWatchAuditSink
from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table
from keyturn.aws.keysource import AwsKeySource
from keyturn.aws.kms import AwsKms

__all__ = ["AwsKms", "DynamoDbKeyRegistry", "create_table", "CloudWatchAuditSink", "AwsKeySource"]
