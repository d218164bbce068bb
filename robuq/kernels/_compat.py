"""Triton CPU-interpreter switch (TRITON_INTERPRET=1) and a NumPy-2 fix for it."""

from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_index() -> None:
    """Triton's CPU interpreter turns a tensor into a loop bound with ``int(array)``, which NumPy 2
    refuses for the 1-element arrays it uses for scalars; use ``.item()`` (CPU tests only)."""
    from triton.runtime import interpreter as _interp

    original = _interp._patch_lang_tensor
    if getattr(original, "_robuq_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._robuq_patched = True
    _interp._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()
