"""Test-speed shim for Triton's interpreter: one patch of ``triton.language`` per launch.

Inside a kernel it runs, the interpreter re-patches ``triton.language`` on every call of a
device function (``tl.sum``, ``tl.cumsum``, ``tl.max`` ...), walking the language's modules
with ``inspect.getmembers`` each time. The launch has already patched those same module
objects (a device function of ``triton.language.standard`` also sees ``tl.core``, which
is patched on its first call), so the repeated patches change nothing; they were about a
third of the interpreter's time in the channel-decay kernels. ``install()`` patches each
language module once per launch. Where Triton's internals differ from what this expects
(another version), it installs nothing.
"""
from __future__ import annotations


class _InForce:
    """The scope of a nested patch: nothing of its own to restore."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Skip the redundant nested patches; returns whether it did (idempotent)."""
    import inspect

    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    original = getattr(ti, "_patch_lang", None)
    if original is None or not hasattr(ti, "GridExecutor"):
        return False
    if getattr(original, "linattn_once", False):
        return True
    state = {"active": False, "langs": set()}

    def langs(fn) -> set[int]:  # the language modules a function sees (what a patch patches)
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        mine = langs(fn)
        if state["active"]:
            if mine <= state["langs"]:  # patched already in this launch: nothing to do
                return _InForce()
            state["langs"] |= mine  # a module the launch has not patched (tl.core, seen by tl.sum)
            return original(fn)
        scope = original(fn)
        restore = scope.restore
        state.update(active=True, langs=mine)

        def restore_and_end() -> None:
            state["active"] = False
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang.linattn_once = True
    ti._patch_lang = patch_lang
    return True
