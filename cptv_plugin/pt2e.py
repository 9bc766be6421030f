"""``refine_pt2e``: CPT-V refinement of a torchao PT2E model between calibration and ``convert_pt2e``.

torch.ao's FX graph mode quantization is deprecated upstream; its successor is torchao's PT2E flow
(``torch.export`` → ``prepare_pt2e(model, quantizer)`` → calibrate → ``convert_pt2e``). The same engine as
``refine_fx`` serves it: observers are simulated, the exported graph is cut between blocks found by the same
adapter registry from the graph's ``nn_module_stack`` metadata, and the refined scales go back as frozen torchao
observers, which ``convert_pt2e`` turns into quantize/dequantize nodes carrying exactly those scales.
"""

from __future__ import annotations

from torch import fx, nn

from .config import SearchConfig, SearchConfigLike
from .refinement import run_refinement
from .search import RefineResult

__all__ = ["refine_pt2e", "is_pt2e_prepared", "is_exported_graph"]

INSTALL_HINT = "pip install 'cptv_plugin[pt2e]' (torchao>=0.18,<0.19)"


def _torchao_quantizer_types() -> tuple[type, ...]:
    try:
        from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase
    except ImportError:
        return ()
    return ObserverBase, FakeQuantizeBase


def is_exported_graph(model: nn.Module) -> bool:
    """A GraphModule of ATen operators (``torch.export(...).module()``)."""
    import torch

    return isinstance(model, fx.GraphModule) and any(
        isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes if n.op == "call_function")


def is_pt2e_prepared(model: nn.Module) -> bool:
    """Whether ``model`` comes from ``prepare_pt2e`` / ``prepare_qat_pt2e`` (False without torchao)."""
    types = _torchao_quantizer_types()
    return bool(types) and isinstance(model, fx.GraphModule) and any(isinstance(m, types) for m in model.modules())


def refine_pt2e(prepared: fx.GraphModule, calib_data, *, config: SearchConfigLike = None,
                fp_model: nn.Module | None = None, blocks: list[str] | None = None) -> RefineResult:
    """Refine the scales of a calibrated PT2E model in place with CPT-V's block-wise search.

    Same contract as :func:`refine_fx`: call it between calibration and ``convert_pt2e``; the module stays what
    ``convert_pt2e`` expects, and the converted model's quantize/dequantize nodes carry the refined scales.

    Args:
        prepared: the module from ``prepare_pt2e`` (observers) or ``prepare_qat_pt2e`` (FakeQuantize),
            calibrated. Any torchao quantizer works (X86Inductor, XNNPACK, your own).
        calib_data: calibration images (tensor, list of tensors or DataLoader).
        config: search settings: a ``SearchConfig``, a preset name (``"fast"``), a mapping of settings, or ``None``
            for our default preset (``SearchConfig.resolve``).
        fp_model: the full-precision model to match; ``None`` uses ``prepared`` with quantization off.
        blocks: module paths of the blocks, to skip automatic block discovery.

    Example:
        >>> exported = torch.export.export(model, (images[:1],)).module()
        >>> prepared = prepare_pt2e(exported, X86InductorQuantizer().set_global(config))
        >>> prepared(images)                                   # calibration
        >>> cptv_plugin.refine_pt2e(prepared, images)
        >>> quantized = convert_pt2e(prepared)                 # carries the refined scales
    """
    from .fx.refine import FxSession, NotPreparedError

    if not _torchao_quantizer_types():
        raise ImportError(f"refine_pt2e needs torchao: {INSTALL_HINT}")
    if not is_pt2e_prepared(prepared):
        from .frameworks import other_framework_hint

        if is_exported_graph(prepared):
            raise NotPreparedError(
                "this exported model holds no PT2E observer: it was exported but not prepared. Run "
                "prepare_pt2e(model, quantizer) (or prepare_qat_pt2e) and a calibration loop before refine_pt2e.")
        raise NotPreparedError(
            f"refine_pt2e needs the module returned by torchao's prepare_pt2e or prepare_qat_pt2e; got "
            f"{type(prepared).__name__}. Export it (torch.export.export(model, args).module()), prepare it with a "
            "torchao quantizer and calibrate it first." + other_framework_hint(prepared, "pt2e"))
    config = SearchConfig.resolve(config)
    session = FxSession(prepared, blocks=blocks, roles=config.roles, flavor="pt2e",
                        search_outside_blocks=config.search_outside_blocks)
    return run_refinement(session, calib_data, config, fp_model)
