"""Training data: batches from the toy world or preprocessed shards, the datasets and encoders that make shards, file digests."""
