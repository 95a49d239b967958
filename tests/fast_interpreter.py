"""Test-speed shim for Triton's interpreter: one patch of ``triton.language`` per launch.

Inside a kernel it runs, the interpreter re-patches ``triton.language`` on every call of a
device function (``tl.sum``, ``tl.cumsum``, ``tl.max`` ...), walking the language's modules
with ``inspect.getmembers`` each time. The launch has already patched those same module
objects, and restores them when it ends, so the nested patches change nothing; they were
about a third of the interpreter's time in the channel-decay kernels. ``install()`` makes
a nested call use the launch's patch. Where Triton's internals differ from what this
expects (another version), it installs nothing.
"""
from __future__ import annotations


class _InForce:
    """The scope of a nested patch: nothing of its own to restore."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Skip the redundant nested patches; returns whether it did (idempotent)."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    original = getattr(ti, "_patch_lang", None)
    if original is None or getattr(original, "linattn_once", False) or not hasattr(ti, "GridExecutor"):
        return original is not None and getattr(original, "linattn_once", False)
    active = [False]

    def patch_lang(fn):
        if active[0]:  # a device function inside a running launch: the launch's patch is in force
            return _InForce()
        scope = original(fn)
        restore = scope.restore
        active[0] = True

        def restore_and_end() -> None:
            active[0] = False
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang.linattn_once = True
    ti._patch_lang = patch_lang
    return True
