"""Training and evaluation data: metadata, webdataset shards, image decoding and transforms, synthetic world."""
