"""tdm: Trajectory Distribution Matching distillation."""
import os as _os
import platform as _platform

__version__ = "0.1.0"

# CPU kernels pinned to AVX2 on x86-64 (unless the variables are set): ATen's vectorised kernels and oneDNN's
# convolutions otherwise dispatch to AVX-512 where the CPU has it and round differently, so the digits
# classifier, the teacher and every recorded digits figure would differ from machine to machine (measured: the
# metric classifier's weights; the teacher's 50-step FID 4.45 vs 4.92). Read by torch at its first kernel, so
# it must come before any CPU compute; no effect on GPU kernels. docs/evaluation.md, "Reproducibility".
CPU_ISA_PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if _platform.machine().lower() in ("x86_64", "amd64"):
    for _name, _value in CPU_ISA_PIN.items():
        _os.environ.setdefault(_name, _value)
