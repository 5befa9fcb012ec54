"""The pass contract.

A pass is a small class with a registry ``name``, a one-line ``summary``, a
``lossless`` flag, an ``Options`` dataclass with defaults, and
``run(graph, ctx) -> PassResult`` that rewrites the gs.Graph in place.

Example::

    @register_pass
    class RemoveFoo(Pass):
        name = "remove-foo"
        summary = "Remove Foo nodes that do nothing."
        lossless = True

        @dataclass
        class Options:
            keep_last: bool = False

        def run(self, graph, ctx):
            ...
            return PassResult(changed=n > 0, counters={"nodes_removed": n})
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import onnx_graphsurgeon as gs

    from .context import PassContext

TARGETS = ("cpu", "cuda", "tensorrt")


@dataclass
class NoOptions:
    """A pass without options."""


@dataclass
class PassResult:
    # True when the pass rewrote the graph. False promises the graph is untouched: the
    # PassManager then skips cleanup, toposort and verification for this pass.
    changed: bool
    counters: dict[str, float] = field(default_factory=dict)
    # Human-readable notes, e.g. why a candidate was skipped ("Conv_3: weight is not constant").
    notes: list[str] = field(default_factory=list)


class Pass:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = True
    # Targets the pass is valid for; presets only include a pass for these targets.
    targets: ClassVar[tuple[str, ...]] = TARGETS
    Options: ClassVar[type] = NoOptions
    # Run once, outside the lossless fixed-point group: for passes that convert the graph
    # into a form other passes no longer match (contrib ops, opset upgrades, annotations).
    run_once: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    def run(self, graph: "gs.Graph", ctx: "PassContext") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def option_fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.Options))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"
