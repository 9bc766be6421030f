"""cptv_plugin: refine the quantization scales of an already-quantized vision transformer with CPT-V.

Use it after ordinary post-training quantization with torch.ao FX (``refine_fx``); the model stays in the
state the framework's next step expects (``convert_fx``).
"""

from .blocks import (BlockAdapter, ModelStructure, UnsupportedModelError, discover_blocks, list_block_adapters,
                     register_block_adapter)
from .config import SearchConfig
from .data import CalibrationError
from .engine import ModelOutputError
from .fitness import list_fitness, register_fitness
from .fx.quantizers import RefinedObserver
from .fx.refine import NoQuantizersError, NotPreparedError, refine_fx
from .search import RefineResult

__version__ = "0.1.0"

__all__ = [
    "refine_fx",
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
    "__version__",
]
