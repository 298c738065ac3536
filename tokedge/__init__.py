"""tokedge: visual-token reduction for VLMs, exported to ONNX and TensorRT for edge GPUs.

Importing the package imports neither torch, transformers, onnxruntime nor tensorrt; each lives
behind the module that needs it.
"""

__version__ = "0.1.0"
