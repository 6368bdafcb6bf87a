"""Run the project's own verifier under aarch64 user-mode emulation, one CPU model at a time.

`qemu-aarch64-static -cpu MODEL -L ROOTFS ROOTFS/usr/bin/python3.11 -m export.verify --json ...`
with PYTHONPATH = the folder this project's wheel is installed in with `[runtime]` (export.arm.cache):
the same TF-free code as on x86, as a device installs it. No source tree is on the guest's path
(PYTHONSAFEPATH, and it runs in a temporary folder); the probe says where `export` came from.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from export.arm.cache import Emulator
from export.errors import EmulatorError, UsageError, one_line

# The CPU models runs may name (`-cpu help`), with the MIDR that /proc/cpuinfo reports for them.
# qemu 7.2's user mode passes the host's (x86) /proc/cpuinfo through; onnxruntime's cpuinfo
# library then finds no ARM core and crashes (SIGSEGV at import), so ROOTFS/proc/cpuinfo is
# written for the model (qemu -L serves the root file system's copy first). Features come from
# the auxiliary vector (HWCAP), which qemu sets from the model itself.
MIDR = {
    "max": 0x000F0510,  # implementer 0, part 'Q': qemu's own
    "cortex-a53": 0x410FD034,
    "cortex-a57": 0x411FD070,
    "cortex-a72": 0x410FD083,
    "cortex-a76": 0x414FD0B1,
    "neoverse-n1": 0x414FD0C1,
    "a64fx": 0x461F0010,
}
# The default models: everything qemu emulates (ARMv8.x/9 with fp16 arithmetic, dot product,
# i8mm, SVE and SME), the same without SME, and a plain ARMv8.0 core (no fp16 arithmetic).
DEFAULT_CPUS = ("max", "max,sme=off", "cortex-a53")
# The HWCAP/HWCAP2 bits (Linux arch/arm64 uapi hwcap.h) that decide kernels here.
HWCAP_BITS = {"fphp": 9, "asimdhp": 10, "asimddp": 20, "sve": 22}
HWCAP2_BITS = {"sve2": 1, "i8mm": 13, "bf16": 14, "sme": 23}

_PROBE = r"""
import json, platform, struct, sys
import export, export.runtime.verify.cli
heavy = sorted(m for m in ("tensorflow", "keras", "tf2onnx", "onnx") if m in sys.modules)
data = open("/proc/self/auxv", "rb").read()
aux = dict(struct.iter_unpack("<QQ", data))
hw, hw2 = aux.get(16, 0), aux.get(26, 0)
bits, bits2 = %s, %s
print(json.dumps({"machine": platform.machine(), "heavy_imports": heavy,
                  "export": export.__file__,
                  "features": [n for n, b in bits.items() if hw >> b & 1]
                  + [n for n, b in bits2.items() if hw2 >> b & 1]}))
"""


def check_cpu(cpu: str) -> str:
    """`cpu` (a model, optionally with qemu properties: `max,sme=off`) if its model is known."""
    model = cpu.split(",", 1)[0]
    if model not in MIDR:
        raise UsageError(f"unknown CPU model {cpu!r}; known: {', '.join(MIDR)} "
                         "(qemu properties may follow: max,sme=off)")
    return cpu


def write_cpuinfo(rootfs: str, cpu: str) -> None:
    """ROOTFS/proc/cpuinfo as an arm64 kernel writes it, for `cpu`'s MIDR."""
    midr = MIDR[check_cpu(cpu).split(",", 1)[0]]
    block = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd cpuid\n"
             f"CPU implementer\t: 0x{midr >> 24:02x}\nCPU architecture: 8\n"
             f"CPU variant\t: 0x{midr >> 20 & 0xF:x}\nCPU part\t: 0x{midr >> 4 & 0xFFF:03x}\n"
             f"CPU revision\t: {midr & 0xF}\n")
    os.makedirs(os.path.join(rootfs, "proc"), exist_ok=True)
    text = "\n".join(block.format(i=i) for i in range(os.cpu_count() or 1))
    with open(os.path.join(rootfs, "proc", "cpuinfo"), "w", encoding="ascii") as f:
        f.write(text + "\n")


def guest_command(emulator: Emulator, cpu: str, args: list[str]) -> tuple[list[str], dict]:
    """The qemu command line and environment that run the guest Python with `args`."""
    env = {
        "PYTHONPATH": os.path.abspath(emulator.site),
        "PYTHONSAFEPATH": "1",  # no current folder (nor script folder) on sys.path: the install only
        "PYTHONDONTWRITEBYTECODE": "1",  # the cache stays as pip installed it
        "PYTHONIOENCODING": "utf-8", "LANG": "C.UTF-8", "PATH": "/usr/bin:/bin",
        "HOME": tempfile.gettempdir(),
    }
    argv = [emulator.qemu, "-cpu", cpu, "-L", os.path.abspath(emulator.rootfs),
            os.path.abspath(emulator.python), *args]
    return argv, env


def guest(emulator: Emulator, cpu: str, args: list[str], *,
          timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the guest Python with `args` under `-cpu cpu`; what `emulator.site` holds importable
    (the installed `xattn[runtime]`), and nothing of the current folder."""
    write_cpuinfo(emulator.rootfs, cpu)
    argv, env = guest_command(emulator, cpu, args)
    try:
        return subprocess.run(argv, env=env, cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulatorError(f"-cpu {cpu}: no answer from the emulated verifier in {timeout:.0f} s") from None
    except OSError as e:
        raise EmulatorError(f"-cpu {cpu}: cannot start {emulator.qemu}: {e.strerror or e}") from None


def _failure(cpu: str, done: subprocess.CompletedProcess) -> EmulatorError:
    lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
    last = lines[-1] if lines else "no output"
    return EmulatorError(f"-cpu {cpu}: the emulated verifier exited {done.returncode}: "
                         f"{one_line(last, 240)}")


def probe(emulator: Emulator, cpu: str) -> dict:
    """{"machine": "aarch64", "heavy_imports": [], "export": its __init__.py, "features": [...]}.

    It imports `export.runtime.verify.cli` first: `heavy_imports` lists TensorFlow, Keras, tf2onnx or
    onnx if that import pulled any in (it must not: none is in the guest); `export` is where the
    package was imported from (the installed wheel, export.arm.run_all checks); `features` the
    HWCAP_BITS/HWCAP2_BITS set.
    """
    done = guest(emulator, cpu, ["-c", _PROBE % (HWCAP_BITS, HWCAP2_BITS)], timeout=300)
    try:
        if done.returncode:
            raise ValueError
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise _failure(cpu, done) from None


def verify(emulator: Emulator, path: str, cpu: str) -> dict[str, dict]:
    """`python -m export.verify --json` on `path` under `-cpu cpu`: manifest name -> result.

    Raises:
        EmulatorError: the verifier crashed, could not start or wrote no results (a file that
            fails verification is a result, not an error).
    """
    with tempfile.TemporaryDirectory(prefix="xattn-arm-") as tmp:
        out = os.path.join(tmp, "results.json")
        done = guest(emulator, cpu, ["-m", "export.verify", "-q", "--json", out,
                                     os.path.abspath(path)])
        if done.returncode not in (0, 1) or not os.path.isfile(out):
            raise _failure(cpu, done)
        with open(out, encoding="utf-8") as f:
            return {r["manifest"]: r for r in json.load(f)}
