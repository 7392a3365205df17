"""Street-scale place recognition: models with GeM / NetVLAD aggregation, evaluation on the field's dataset
layout (docs/place-recognition.md)."""
