"""stepadapt.export: ONNX and TensorRT artifacts of a bundle."""

# Images per expert batch: the TensorRT engine's largest profile, the Triton configs'
# max_batch_size and the most images one request may ask for are all this one setting.
MAX_BATCH = 64
