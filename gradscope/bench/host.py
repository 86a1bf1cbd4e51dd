"""What machine a run ran on, for the provenance lines of generated numbers."""

from __future__ import annotations

import platform
import re


def cpu_label() -> str:
    """This processor as provenance lines name it: its model name and the vector instructions torch's CPU kernels use
    here (``"AMD EPYC, AVX512"``). CPU results reproduce on the same kind of processor, not across kinds: the kernels
    differ in their rounding, and training amplifies it."""
    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "")()
    return ", ".join(x for x in (re.sub(r"[()]", "", name), capability) if x)
