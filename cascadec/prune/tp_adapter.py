"""Every private Torch-Pruning symbol cascadec touches, in one place, for the versions tested.

cascadec reads channel groups through Torch-Pruning's public ``DependencyGraph``
(``build_dependency``, ``get_pruning_group``, ``get_pruner_of_module``, the pruning functions) from
``prune/groups.py`` and ``prune/shrink.py``. Analysis of models the library cannot map (channel
shuffles, window partitions, deep Swins, slice-adds, split consumers out of order: the cases
``prune/groups.py``'s docstring lists) needs more than its public extension points offer
(``customized_pruners`` and ``unwrapped_parameters`` add layers; nothing there reaches the index
mapping or the shape walk), so this module patches, for the duration of one analysis:

* ``torch_pruning.dependency.index_mapping.update_{reshape,concat,split}_index_mapping``,
  ``_FlattenIndexMapping.__call__`` and ``update_index_mapping``;
* ``torch_pruning.dependency.group.Group.add_dep``;
* ``torch_pruning.dependency.constants.MAX_RECURSION_DEPTH`` (the shape walk's budget).

They are private, so ``TESTED_VERSIONS`` names the releases the suite ran against; pyproject
pins the same, and ``tests/test_architecture.py`` fails on any other installed version.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version

from torch_pruning.dependency import constants, index_mapping
from torch_pruning.dependency import group as tp_groups

TESTED_VERSIONS = ("1.6.1",)  # keep in step with pyproject's torch-pruning pin


def installed_version() -> str:
    return version("torch-pruning")


def default_walk_budget() -> int:
    """The library's own shape-walk step budget."""
    return int(constants.MAX_RECURSION_DEPTH)


@contextmanager
def no_index_remap() -> Iterator[None]:
    """``get_pruning_group`` recomputes every index mapping of the graph on each call (needed
    after a prune changes widths); while nothing is pruned the mappings computed by the trace stay
    valid, and recomputing them per root made analysis quadratic (swin_t, the shufflenets)."""
    remap = index_mapping.update_index_mapping
    index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_index_mapping = remap


class IndexExplosion(Exception):
    """Raised inside Torch-Pruning's index mapping when a group would outgrow the cap."""


def _order_split_outputs(split_node) -> None:
    """Put a split's consumers in the order of the split's outputs.

    Torch-Pruning gives the i-th consumer in its node list the channel offsets of the split's i-th
    output, but the list is in the order the trace met the consumers, not the order of the outputs:
    timm's MixedConv2d (MixNet) feeds output 0 to ``conv.0`` and output 1 to ``conv.1``, the trace
    lists them the other way round, and every channel of one half was mapped onto the other half.
    Autograd knows which output each consumer reads (``output_nr`` of the edge); a consumer that
    reads several outputs of the same split keeps its place (the exactness trial then decides)."""
    grad_fn = getattr(split_node, "grad_fn", None)
    outputs = getattr(split_node, "outputs", None)
    if grad_fn is None or not outputs:
        return
    numbers = []
    for out in outputs:
        edges = getattr(getattr(out, "grad_fn", None), "next_functions", None) or ()
        found = {nr for fn, nr in edges if fn is grad_fn}
        if len(found) != 1:
            return
        numbers.append(found.pop())
    if len(set(numbers)) == len(numbers):
        split_node.outputs = [out for _, out in sorted(zip(numbers, outputs), key=lambda pair: pair[0])]


@contextmanager
def guarded_index_mapping(
    opaque_reshapes: set,
    max_indices: int,
    walk_budget: int | None = None,
    failed_concats: set | None = None,
    max_deps: int | None = None,
):
    """Patch Torch-Pruning's index mapping for the duration of one analysis: reshapes whose
    mapping cannot be inferred are recorded in ``opaque_reshapes`` (their groups get frozen)
    instead of aborting the trace, and a flatten mapping that would emit more than
    ``max_indices`` indices raises IndexExplosion instead of exhausting memory.

    A valid mapping emits distinct channel indices of one layer, so it can never be wider
    than the widest layer (a flatten into the classifier: C*H*W = in_features). Window and
    head reshapes around residual loops blow past that within a hop or two.

    ``walk_budget`` replaces Torch-Pruning's shape-walk step budget for the duration;
    concats that fail on a None width are also added to ``failed_concats``.

    ``max_deps`` caps the dependencies one group may collect: Torch-Pruning's walk re-enters a
    node whenever it arrives with other indices, and a slice-add that pads channels (ReXNet's
    ``x[:, :c] += shortcut``) sends it round the same residual loop with ever new index lists,
    for minutes. A real group has a few entries per layer."""
    original_reshape = index_mapping.update_reshape_index_mapping
    original_concat = index_mapping.update_concat_index_mapping
    original_call = index_mapping._FlattenIndexMapping.__call__
    original_budget = constants.MAX_RECURSION_DEPTH

    def reshape_mapping(graph, node):
        try:
            original_reshape(graph, node)
        except (ZeroDivisionError, ValueError, TypeError):
            opaque_reshapes.add(node)

    def concat_mapping(graph, node):
        try:
            original_concat(graph, node)
        except TypeError:  # an input width inferred as None: the slices cannot be placed
            opaque_reshapes.add(node)
            if failed_concats is not None:
                failed_concats.add(node)

    def bounded_call(self, idxs):
        if not self.reverse and len(idxs) * self._stride > max_indices:
            raise IndexExplosion
        return original_call(self, idxs)

    original_split = index_mapping.update_split_index_mapping

    def split_mapping(graph, node):
        _order_split_outputs(node)
        original_split(graph, node)

    original_add_dep = tp_groups.Group.add_dep

    def bounded_add_dep(self, dep, idxs):
        if max_deps is not None and len(self._group) >= max_deps:
            raise IndexExplosion
        return original_add_dep(self, dep, idxs)

    index_mapping.update_reshape_index_mapping = reshape_mapping
    index_mapping.update_concat_index_mapping = concat_mapping
    index_mapping.update_split_index_mapping = split_mapping
    index_mapping._FlattenIndexMapping.__call__ = bounded_call
    tp_groups.Group.add_dep = bounded_add_dep
    constants.MAX_RECURSION_DEPTH = original_budget if walk_budget is None else walk_budget
    try:
        with warnings.catch_warnings():
            # the walk's own "Maximum recursive depth reached!": its None answers are handled
            # above (opaque nodes, frozen groups), so the warning tells a user nothing
            warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
            yield
    finally:
        index_mapping.update_reshape_index_mapping = original_reshape
        index_mapping.update_concat_index_mapping = original_concat
        index_mapping.update_split_index_mapping = original_split
        index_mapping._FlattenIndexMapping.__call__ = original_call
        tp_groups.Group.add_dep = original_add_dep
        constants.MAX_RECURSION_DEPTH = original_budget
