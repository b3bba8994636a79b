"""torch.jit.script refuses fused modules with a message that says what to do instead.

TorchScript would have to compile the ops' Python front end (argument checks, autocast,
backend selection), which it cannot: it failed deep inside with "Unknown type annotation:
'BlockPlan'". torch.jit.script calls `__prepare_scriptable__` on every submodule before
compiling anything, so the refusal comes first and names the module. (Returning the unfused
original there instead would not do: torch.jit.script writes what it returns into the
caller's own model, un-converting it in place.)
"""

from __future__ import annotations


class NotScriptable:
    """Mixin for fused_res modules: torch.jit.script raises a RuntimeError naming the
    module's class and the ways out (revert, torch.compile, torch.export, torch.jit.trace)."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile fused_res's {type(self).__name__}: the fused "
            "ops are Python, not TorchScript; accepted: torch.compile, torch.export or "
            "torch.jit.trace of it, or, for a model fused_res.convert() made, "
            "torch.jit.script of fused_res.revert(model) (the unfused model, same "
            "parameters)")
