"""The machine record of a run: the CPU (bench.common.machine_info: ISA tiers, caches, threads)
and, for a CUDA run, the GPU, driver and matmul precision settings."""
import contextlib
import platform
import subprocess
import textwrap


def machine_info(device="cpu"):
    import torch

    from bench.common import machine_info as cpu_info

    info = cpu_info()
    if torch.device(device).type != "cuda":
        return info
    info.update(cuda=torch.version.cuda, host=platform.node(), gpu=None, driver=None,
                allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                fp16_reduced_precision_reduction=bool(
                    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
    else:
        info["gpu"] = f"none ({device})"
    return info


def machine_line(info, width=118):
    return textwrap.fill(", ".join(f"{k}={v}" for k, v in info.items() if v is not None),
                         width=width, initial_indent="machine: ", subsequent_indent="         ")
