"""tdm pins torch's CPU kernels to AVX2 on x86-64 (tdm/__init__.py), so CPU figures reproduce across machines."""
import os
import platform
import subprocess
import sys

import pytest

PROBE = "import tdm, torch; print(torch.backends.cpu.get_cpu_capability(), __import__('os').environ['ONEDNN_MAX_CPU_ISA'])"

x86 = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                         reason=f"the pin is for x86-64 (this machine: {platform.machine()})")


def _probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    return subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          check=True).stdout.split()


@x86
def test_importing_tdm_pins_avx2_kernels():
    # x86-64 CPUs torch 2.14 runs on have AVX2; an AVX-512 machine would report AVX512 without the pin
    assert _probe() == ["AVX2", "AVX2"]


@x86
def test_a_users_own_setting_wins():
    assert _probe(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41") == ["DEFAULT", "SSE41"]
