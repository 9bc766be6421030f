"""Cut a model that torch.fx cannot trace (Hugging Face's vision transformers) between its blocks, by calling them.

One forward of example images records how the model calls each block (arguments and output) and when each watched
module (a quantizer) runs: before the first block, inside a block, between two blocks or after the last one.

- Where block k+1 receives block k's output unchanged (its first argument *is* the block's output or the first item
  of it, its other arguments are block k's own, and no module runs in between), block k's segment calls the block
  alone.
- Elsewhere (Swin's patch merging between stages) block k's segment runs the model's own forward with the earlier
  blocks skipped (each returns its input) and block k fed its cached inputs, and stops when block k+1 is called.
- The prefix runs the model until the first block is called; the tail runs it with every block skipped and the last
  one returning its cached output. Both re-run the model's stem, which is cheap next to a block.

The chain is checked once against the model's own output on the example images before it is used; a model whose
blocks are called in another way (twice, out of order, passing on more than one tensor) raises :class:`CutError`,
and the caller runs the whole model per candidate instead, its quantizers grouped where the recorded forward ran them
when it got that far.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .engine import Segment, SegmentedModel, _as_output_tensor

__all__ = ["CutError", "cut_between_blocks"]

IMAGES = "images"


class CutError(RuntimeError):
    """The model calls its blocks in a way the block-call cut cannot replay; it says how. Where the recorded forward
    got as far as telling which group each watched module runs in, ``groups`` says so (else it is empty): the whole
    model, run per candidate instead, can still group its quantizers as they run."""

    def __init__(self, message: str, groups: dict[str, int] | None = None):
        super().__init__(message)
        self.groups = groups or {}


class _Stop(Exception):
    """Raised by the pre-hook of the block a segment stops at, carrying that block's inputs."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args_, self.kwargs = args, kwargs


@dataclass
class _BlockCall:
    args: tuple
    kwargs: dict
    output: Any = None
    names: list[str] = field(default_factory=list)  # the env names of ``args`` then ``kwargs``, in that order

    @property
    def values(self) -> list[Any]:
        return [*self.args, *self.kwargs.values()]


def _passed_on(output: Any) -> torch.Tensor | None:
    """The tensor a block passes on: its output, or the first item of a tuple whose other items are ``None``."""
    if isinstance(output, torch.Tensor):
        return output
    if type(output) in (tuple, list) and output and isinstance(output[0], torch.Tensor) and \
            all(item is None for item in output[1:]):  # not a named tuple: it is rebuilt from a list
        return output[0]
    return None


def _like_output(recorded: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` in the structure of a block's recorded output (itself, or first of a tuple of Nones)."""
    if isinstance(recorded, torch.Tensor):
        return tensor
    return type(recorded)([tensor, *recorded[1:]])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value without a plain equality is not the same value
        return False


@contextlib.contextmanager
def _forwards(replacements: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Replace modules' ``forward`` while it lasts (hooks still run; an instance ``forward`` is put back)."""
    saved = {module: module.__dict__.get("forward") for module in replacements}
    try:
        for module, forward in replacements.items():
            module.forward = forward
        yield
    finally:
        for module, old in saved.items():
            if old is None:
                del module.forward
            else:
                module.forward = old


@contextlib.contextmanager
def _stop_at(block: nn.Module) -> Iterator[None]:
    def hook(module, args, kwargs):
        raise _Stop(args, kwargs)

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class _Recording:
    """One forward of the model with every block's call and every watched module's phase recorded."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], watched: dict[str, nn.Module],
                 images: torch.Tensor):
        self.calls: list[_BlockCall | None] = [None] * len(blocks)
        self.phases: dict[str, list[tuple[str, int]]] = {path: [] for path in watched}
        self.between: set[int] = set()  # the k after which a module outside the blocks runs before block k+1
        self.phase: tuple[str, int] = ("prefix", -1)
        inside = {id(m) for block in blocks for m in block.modules()}
        handles = []
        try:
            for index, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(self._entering(index), with_kwargs=True))
                handles.append(block.register_forward_hook(self._leaving(index), with_kwargs=True))
            for path, module in watched.items():
                handles.append(module.register_forward_pre_hook(self._watching(path)))
            for module in model.modules():
                if id(module) not in inside:
                    handles.append(module.register_forward_pre_hook(self._outside))
            with torch.no_grad():
                self.output = model(images)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i, call in enumerate(self.calls) if call is None or call.output is None]
        if missing:
            raise CutError(f"block {missing[0]} was not called (or did not return) in a forward of the model")
        if self.phase != ("after", len(blocks) - 1):
            raise CutError("the blocks did not finish in order")

    def _entering(self, index: int):
        def hook(module, args, kwargs):
            if self.phase != (("prefix", -1) if index == 0 else ("after", index - 1)) or self.calls[index]:
                raise CutError(f"block {index} is called out of order, inside another block or more than once")
            self.calls[index] = _BlockCall(args, dict(kwargs))
            self.phase = ("block", index)
        return hook

    def _leaving(self, index: int):
        def hook(module, args, kwargs, output):
            self.calls[index].output = output
            self.phase = ("after", index)
        return hook

    def _watching(self, path: str):
        def hook(module, args):
            self.phases[path].append(self.phase)
        return hook

    def _outside(self, module, args):
        if self.phase[0] == "after":
            self.between.add(self.phase[1])


class _BlockCallChain(SegmentedModel):
    """The chain of block calls; a whole forward is the model's own, so that every module runs once per forward, on
    real values (the prefix runs again in later segments, and glue on skipped blocks' inputs): hooks that gather
    statistics (the activation-MSE start) see what they see in the model."""

    def __init__(self, model: nn.Module, segments: list[Segment]):
        super().__init__(segments, lambda images: {IMAGES: images}, feature_names=["features"])
        self.model = model

    def forward(self, images: torch.Tensor, eager: bool = False) -> Any:
        return self.model(images)


def _group_of_phase(phase: tuple[str, int], n_blocks: int) -> int:
    """prefix → group 0, block k and what runs after it before block k+1 → k+1, after the last block → the head."""
    kind, index = phase
    if kind == "prefix":
        return 0
    if kind == "after" and index == n_blocks - 1:
        return n_blocks + 1
    return index + 1


def cut_between_blocks(model: nn.Module, block_paths: list[str], images: torch.Tensor,
                       watched: dict[str, nn.Module]) -> tuple[SegmentedModel, dict[str, int]]:
    """Cut ``model`` (in eval mode) into prefix, one segment per block and the tail, by recording one forward of
    ``images``; returns the chain (segment ``g`` holds group ``g``: prefix, blocks, head) and the group of each
    ``watched`` module that ran (the earliest, where it ran in several)."""
    if not block_paths:
        raise CutError("no blocks to cut at")
    blocks = [model.get_submodule(path) for path in block_paths]
    recording = _Recording(model, blocks, watched, images)
    n = len(blocks)
    groups = {path: min(_group_of_phase(p, n) for p in phases) for path, phases in recording.phases.items() if phases}
    try:
        return _replay(model, block_paths, blocks, recording, images), groups
    except CutError as error:
        raise CutError(str(error), groups) from None


def _replay(model: nn.Module, block_paths: list[str], blocks: list[nn.Module], recording: _Recording,
            images: torch.Tensor) -> SegmentedModel:
    """The chain of segments that replays ``recording``'s block calls, checked against the model's output."""
    calls: list[_BlockCall] = recording.calls  # type: ignore[assignment]
    n = len(blocks)
    for index, call in enumerate(calls):
        passed = _passed_on(call.output)
        first = call.args[0] if call.args else None
        if passed is None or not isinstance(first, torch.Tensor) or first.shape != passed.shape:
            raise CutError(f"block {block_paths[index]} does not take one tensor as its first argument and return "
                           "one of the same shape (alone or first of a tuple of Nones)")
    # which boundaries the block alone crosses: block k+1 gets block k's output and block k's other arguments
    direct = [k not in recording.between
              and calls[k + 1].args[0] is _passed_on(calls[k].output)
              and len(calls[k + 1].args) == len(calls[k].args)
              and list(calls[k + 1].kwargs) == list(calls[k].kwargs)
              and all(_same(a, b) for a, b in zip(calls[k + 1].values[1:], calls[k].values[1:]))
              for k in range(n - 1)]
    for k, call in enumerate(calls):
        own = [f"block{k}.arg{i}" for i in range(len(call.args))] + [f"block{k}.{key}" for key in call.kwargs]
        call.names = own if k == 0 or not direct[k - 1] else [own[0], *calls[k - 1].names[1:]]

    def skipping(upto: int) -> dict[nn.Module, Callable[..., Any]]:
        """Blocks before ``upto`` return their input in the structure of their output."""
        return {blocks[j]: (lambda *args, _out=calls[j].output, **kwargs: _like_output(_out, args[0]))
                for j in range(upto)}

    def rebuild(call: _BlockCall, values: tuple) -> tuple[tuple, dict]:
        return tuple(values[:len(call.args)]), dict(zip(call.kwargs, values[len(call.args):]))

    def run_until(stop: int, replacements: dict[nn.Module, Callable[..., Any]], images: torch.Tensor) -> tuple:
        with _forwards(replacements), _stop_at(blocks[stop]):
            try:
                model(images)
            except _Stop as stopped:
                return (*stopped.args_, *stopped.kwargs.values())
        raise CutError(f"the model did not call {block_paths[stop]} this time")

    segments = [Segment(lambda images: run_until(0, {}, images), [IMAGES], calls[0].names, compilable=False)]
    for k, call in enumerate(calls):
        block, forward = blocks[k], blocks[k].forward
        if k == n - 1 or direct[k]:
            def call_block(*values, _call=call, _block=block):
                args, kwargs = rebuild(_call, values)
                return _passed_on(_block(*args, **kwargs))
            # eager, as the rest: compiling the call recompiles it for every block (dynamo guards on the block) and
            # gives up past 8. On an H100 a 12-block HF ViT refined in 110 s so (about 50 of them ModelOpt building
            # its CUDA extension on a fresh machine), in 9.5 s eager (benchmarks/hugging_face_cut.py)
            segments.append(Segment(call_block, list(call.names), [f"block{k + 1}.arg0" if k < n - 1 else "features"],
                                    compilable=False))
        else:
            def through_block(images, *values, _k=k, _call=call, _forward=forward):
                args, kwargs = rebuild(_call, values)
                replacements = {**skipping(_k), blocks[_k]: lambda *_, **__: _forward(*args, **kwargs)}
                return run_until(_k + 1, replacements, images)
            segments.append(Segment(through_block, [IMAGES, *call.names], calls[k + 1].names, compilable=False))

    def tail(images, features):
        last = {blocks[n - 1]: lambda *_, **__: _like_output(calls[n - 1].output, features)}
        with _forwards({**skipping(n - 1), **last}):
            return model(images)

    segments.append(Segment(tail, [IMAGES, "features"], None, compilable=False))
    chain = _BlockCallChain(model, segments)
    with torch.no_grad():
        replayed = _as_output_tensor(chain.run(chain.initial_env(images)))
    expected = _as_output_tensor(recording.output)
    if replayed.shape != expected.shape or not torch.allclose(replayed, expected, rtol=1e-4, atol=1e-5):
        raise CutError("the blocks called one by one do not reproduce the model's output (max difference "
                       f"{(replayed - expected).abs().max().item() if replayed.shape == expected.shape else 'shape'})")
    return chain
