"""The models a stage loads (whole or as ZeRO-3 partitions), the trainable units around them, what a finished stage records, and --dry-run's memory estimate."""
