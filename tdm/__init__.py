"""tdm: Trajectory Distribution Matching distillation."""
import os as _os
import platform as _platform
import sys as _sys

__version__ = "0.1.0"

# CPU kernels pinned to AVX2 on x86-64 (unless the variables are set): ATen's vectorised kernels, oneDNN's
# convolutions and MKL's BLAS otherwise dispatch to AVX-512 where the CPU has it and round differently, so the
# digits classifier, the teacher and every recorded digits figure would differ from machine to machine
# (measured: the metric classifier's weights; the teacher's 50-step FID 4.45 vs 4.92). Each variable is read at
# its library's first kernel, so the pin must come before any CPU compute; no effect on GPU kernels; only where
# the CPU reports AVX2 and FMA (forcing ATen's AVX2 kernels on a CPU without them would crash).
# docs/evaluation.md, "Reproducibility".
CPU_ISA_PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _cpu_has_avx2() -> bool:
    """The CPU's flags (Linux /proc/cpuinfo) include avx2 and fma; False where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


if _platform.machine().lower() in ("x86_64", "amd64") and _cpu_has_avx2():
    for _name, _value in CPU_ISA_PIN.items():
        _os.environ.setdefault(_name, _value)
    if "torch" in _sys.modules and _os.environ["ATEN_CPU_CAPABILITY"] == "avx2":
        # torch came first: if it already ran a CPU kernel its capability is fixed; say so instead of pretending
        _torch = _sys.modules["torch"]
        _capability = _torch.backends.cpu.get_cpu_capability()
        if _capability != "AVX2":
            import warnings

            warnings.warn(f"tdm: torch already runs {_capability} CPU kernels (it computed before `import tdm`), so "
                          f"the AVX2 pin for reproducible CPU figures does not apply in this process; import tdm "
                          f"first, or set ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                          f"MKL_ENABLE_INSTRUCTIONS=AVX2 before Python starts (docs/evaluation.md)", stacklevel=2)
