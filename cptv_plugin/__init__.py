"""cptv_plugin: refine the quantization scales of an already-quantized vision transformer with CPT-V.

Use it after ordinary post-training quantization with torch.ao FX (``refine_fx``), NVIDIA ModelOpt
(``refine_modelopt``) or pytorch-quantization (``refine_pytorch_quantization``), or let ``refine`` recognise
the framework. The model stays in the state the framework's next step expects (``convert_fx``, ``mto.save``,
ONNX export); ``export_onnx`` writes a TensorRT explicit-quantization ONNX file.
"""

from .blocks import (BlockAdapter, ModelStructure, UnsupportedModelError, discover_blocks, list_block_adapters,
                     register_block_adapter)
from .config import SearchConfig
from .data import CalibrationError
from .distributed import RankMismatchError
from .engine import ModelOutputError
from .fitness import list_fitness, register_fitness
from .fx.quantizers import RefinedObserver
from .fx.refine import NoQuantizersError, NotPreparedError, refine_fx
from .amax.modelopt import refine_modelopt, refine_modelopt_checkpoint
from .amax.pytorch_quantization import quantize_pytorch_quantization, refine_pytorch_quantization
from .amax.session import NotCalibratedError, UnsupportedQuantizerError
from .export import ExportError, TensorRTRuleError, check_tensorrt_onnx, export_onnx
from .frameworks import UnsupportedFrameworkError, detect_framework, refine
from .pt2e import refine_pt2e
from .search import CheckpointMismatchError, RefineResult

__version__ = "0.1.0"

__all__ = [
    "refine",
    "refine_fx",
    "refine_pt2e",
    "refine_modelopt",
    "refine_modelopt_checkpoint",
    "refine_pytorch_quantization",
    "quantize_pytorch_quantization",
    "export_onnx",
    "check_tensorrt_onnx",
    "detect_framework",
    "SearchConfig",
    "RefineResult",
    "BlockAdapter",
    "ModelStructure",
    "register_block_adapter",
    "list_block_adapters",
    "discover_blocks",
    "register_fitness",
    "list_fitness",
    "RefinedObserver",
    "CalibrationError",
    "ModelOutputError",
    "NotPreparedError",
    "NoQuantizersError",
    "UnsupportedModelError",
    "UnsupportedFrameworkError",
    "NotCalibratedError",
    "UnsupportedQuantizerError",
    "CheckpointMismatchError",
    "RankMismatchError",
    "ExportError",
    "TensorRTRuleError",
    "__version__",
]
