"""What a run records about where it ran: code version, packages, device."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def git_commit() -> str | None:
    """The checkout's commit, read from its .git files (no git process); None when not in a checkout."""
    try:
        root = Path(__file__).resolve().parent.parent
        git = root / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = (git / (git / "commondir").read_text().strip()).resolve() if (git / "commondir").is_file() else git
        for base in dict.fromkeys([git, common]):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
            if (base / "packed-refs").is_file():
                for line in (base / "packed-refs").read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        pass
    return None


def device_name(device: torch.device) -> str:
    """``cuda: NVIDIA H100 ...`` or ``cpu: <processor>, N threads``."""
    import torch  # here, not at the top: `lesft sweep --help` imports this module

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import lesft

    return {"lesft": lesft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}
