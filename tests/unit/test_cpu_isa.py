"""tdm pins torch's CPU kernels to AVX2 on x86-64 (tdm/__init__.py), so CPU figures reproduce across machines."""
import os
import platform
import subprocess
import sys

import pytest

import tdm

PINNED = tuple(tdm.CPU_ISA_PIN)
# ATen's dispatch level, and the ISA oneDNN reports at its first convolution (ONEDNN_VERBOSE)
PROBE = """
import tdm, torch
torch.nn.Conv2d(16, 32, 3)(torch.randn(8, 16, 32, 32))
print("aten", torch.backends.cpu.get_cpu_capability())
"""

pinned_here = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not tdm._cpu_has_avx2(),
                                 reason=f"the pin is for x86-64 CPUs with AVX2 and FMA (this machine: "
                                        f"{platform.machine()})")


def _probe(code: str = PROBE, **env) -> tuple[str, str, str]:
    """(ATen capability, oneDNN's reported ISA line, stderr) of a fresh interpreter."""
    clean = {k: v for k, v in os.environ.items() if k not in PINNED}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, "ONEDNN_VERBOSE": "all", **env},
                         capture_output=True, text=True, check=True)
    aten = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("aten "))
    isa = next((line for line in out.stdout.splitlines() if ",isa:" in line), "")
    return aten, isa, out.stderr


@pinned_here
def test_importing_tdm_pins_avx2_kernels():
    aten, isa, _ = _probe()
    assert aten == "AVX2" and isa.endswith("isa:Intel AVX2")  # an AVX-512 machine reports AVX512 unpinned


@pinned_here
def test_a_users_own_setting_wins():
    aten, isa, _ = _probe(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41")
    assert aten == "DEFAULT" and "SSE4.1" in isa


@pinned_here
def test_torch_computing_before_tdm_is_warned_about():
    late = "import torch\ntorch.randn(4) + 1\n" + PROBE
    aten, _, err = _probe(late)
    if aten == "AVX2":  # an AVX2-only machine: the native level is the pinned one, nothing to warn about
        assert "AVX2 pin" not in err
    else:
        assert "the AVX2 pin for reproducible CPU figures does not apply" in err
    assert "AVX2 pin" not in _probe("import torch\n" + PROBE)[2]  # a bare import torch first is fine
