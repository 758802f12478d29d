"""stepadapt.export: ONNX and TensorRT artifacts of a bundle.

The stage itself (options, parity rules, manifest records) is :func:`stepadapt.export.stage.export`;
it is not imported here, so ``MAX_BATCH`` stays importable without torch and onnx.
"""

# Images per expert batch: the TensorRT engine's largest profile, the Triton configs'
# max_batch_size and the most images one request may ask for are all this one setting.
MAX_BATCH = 64
