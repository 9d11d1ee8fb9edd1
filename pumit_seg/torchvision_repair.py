"""Make `import torchvision` work where its compiled operators cannot load.

Why this exists: on CPU-only machines with a CPU build of torch, the only torchvision
wheels pip can reach are CUDA builds whose C extension cannot load. torchvision then
fails at import with ``RuntimeError: operator torchvision::nms does not exist``, raised
by two unguarded ``torch.library.register_fake`` calls in
``torchvision/_meta_registrations.py`` (the other meta registrations there are guarded
by ``torchvision.extension._has_ops()``). nnU-Net's trainer search imports its Primus
trainers (-> timm -> torchvision) before it looks at ``nnUNet_extTrainer``, so with a
broken torchvision every trainer but ``nnUNetTrainer`` is "not found", ours included.

The repair guards those two registrations the same way as the others. It touches the
installed file only when the import fails with exactly that error; a healthy
torchvision is never modified. torchvision's detection / NMS operators stay unavailable
(they were unavailable anyway); nothing in pumit-seg or nnU-Net's U-Net path uses them.

Run: ``python -m pumit_seg.torchvision_repair`` (the Makefile does it after installing).
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

BROKEN_SIGNATURE = "operator torchvision::"
UNGUARDED = re.compile(r'@torch\.library\.register_fake\(("torchvision::\w+")\)')
GUARDED = r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))"


def torchvision_import_error(python: str = sys.executable) -> str | None:
    """Import torchvision in a fresh interpreter; return its error text, or None if it imports."""
    result = subprocess.run([python, "-c", "import torchvision"], capture_output=True, text=True)
    return None if result.returncode == 0 else result.stderr


def repair() -> str:
    """Repair torchvision if (and only if) it has the known import failure. Returns what was done."""
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed: nothing to repair"
    error = torchvision_import_error()
    if error is None:
        return "torchvision imports: nothing to repair"
    if BROKEN_SIGNATURE not in error:
        raise RuntimeError(f"torchvision fails to import with an error this repair does not know:\n{error}")
    path = Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
    source = path.read_text()
    patched, count = UNGUARDED.subn(GUARDED, source)
    if count == 0:
        raise RuntimeError(f"{path}: no unguarded register_fake call found; cannot repair:\n{error}")
    path.write_text(patched)
    error = torchvision_import_error()
    if error is not None:
        raise RuntimeError(
            f"torchvision still fails to import after guarding {count} calls in {path}:\n{error}"
        )
    return f"guarded {count} register_fake calls in {path}: torchvision imports (its C++ operators stay unavailable)"


def main() -> None:
    print(f"pumit_seg.torchvision_repair: {repair()}")


if __name__ == "__main__":
    main()
