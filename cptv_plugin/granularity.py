"""Which scales the search moves together at each pass: whole blocks (the paper), or PFCR's fine-to-coarse schedule
applied to the scale search (each block's sub-units first, then blocks, then pairs of consecutive blocks).

A unit is a :class:`~cptv_plugin.handles.Group` over some of the model's handles; it re-runs from the segment of
the earliest group it takes handles from, so the fast engine's cache and suffix evaluation work unchanged.
"""

from __future__ import annotations

from .handles import Group

__all__ = ["sub_units", "pairs", "visit_plan"]


def sub_units(group: Group) -> list[Group]:
    """``group`` split by the direct child module of the block its handles belong to (``blocks.0.attn``,
    ``blocks.0.mlp``), in handle order. A handle whose name names no child (torch.ao FX names activation observers
    ``activation_post_process_N``) joins the unit of the next handle that does, or the last unit: in a block's
    graph order the observer before ``mlp.fc1``'s weight is the MLP's input, those after ``mlp.fc2`` its output.
    A group whose handles name fewer than two children stays whole."""
    prefix = group.name + "."
    children: list[str | None] = [h.name[len(prefix):].split(".")[0] if h.name.startswith(prefix) else None
                                  for h in group.handles]
    if len({c for c in children if c is not None}) < 2:
        return [group]
    units: list[tuple[str, list]] = []
    pending: list = []
    for handle, child in zip(group.handles, children):
        pending.append(handle)
        if child is None:
            continue
        if units and units[-1][0] == child:
            units[-1][1].extend(pending)
        else:
            units.append((child, pending))
        pending = []
    units[-1][1].extend(pending)
    return [Group(f"{group.name}.{child}", handles, segment=group.segment, module_paths=group.module_paths)
            for child, handles in units]


def pairs(groups: list[Group]) -> list[Group]:
    """Consecutive groups two by two (the last alone when their number is odd), each re-run from the first's
    segment."""
    merged = []
    for index in range(0, len(groups), 2):
        pair = groups[index:index + 2]
        merged.append(pair[0] if len(pair) == 1 else Group(
            "+".join(g.name for g in pair), [h for g in pair for h in g.handles],
            segment=min(g.segment for g in pair), module_paths=[p for g in pair for p in g.module_paths]))
    return merged


def visit_plan(groups: list[Group], passes: int, granularity: str,
               reverse: bool = False) -> tuple[list[Group], list[tuple[int, int]]]:
    """``(units, visits)``: every unit the search moves, and the ``(pass, unit index)`` of each visit in order.

    ``"block"``: the groups themselves, every pass. ``"fine_to_coarse"``: the first 30 % of the passes (at least
    one) visit :func:`sub_units`, the last 30 % (at least one, where three passes or more) :func:`pairs`, the rest
    whole groups. ``reverse`` visits each pass's units last to first."""
    if passes == 0:
        levels = []
    elif granularity == "block":
        levels = [list(groups)] * passes
    elif granularity == "fine_to_coarse":
        fine = [unit for group in groups for unit in sub_units(group)]
        fine_passes = max(1, round(0.3 * passes))
        coarse_passes = max(1, round(0.3 * passes)) if passes >= 3 else 0
        block_passes = passes - fine_passes - coarse_passes
        levels = [fine] * fine_passes + [list(groups)] * block_passes + [pairs(groups)] * coarse_passes
    else:
        raise ValueError(f"unknown granularity {granularity!r}; choose 'block' or 'fine_to_coarse'")
    units: list[Group] = []
    index_of: dict[str, int] = {}
    visits = []
    for pass_index, level in enumerate(levels):
        order = []
        for unit in level:
            if unit.name not in index_of:
                index_of[unit.name] = len(units)
                units.append(unit)
            order.append(index_of[unit.name])
        visits.extend((pass_index, u) for u in (reversed(order) if reverse else order))
    return units, visits
