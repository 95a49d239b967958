"""Ahead-of-time compilation of generated kernels for an NVIDIA target, without a GPU.

One launch of a generated kernel (captured by :mod:`linattn.inspection`) goes through
Triton's full pipeline to PTX for the target (``sm_90`` by default), specialized as its
launcher would specialize it, then ``ptxas -v`` reports registers, spills and static
shared memory; Triton's own (dynamic) shared memory comes from the compile metadata.
This is how "every generated kernel compiles and does not spill" is checked on a
machine without a GPU.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


__all__ = ["KernelReport", "specialize", "compile_launch", "format_reports"]

@dataclass(frozen=True)
class KernelReport:
    """What the compiler says about one kernel."""

    name: str  # the kernel's function name (the spec's name and the stage)
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of shared memory (Triton's dynamic allocation + static)
    num_warps: int
    stage: str = ""  # the stage (``state_fwd``), where the launch named it
    bytes_read: int = 0  # per launch, each tensor once (from the kernel's manifest)
    bytes_written: int = 0
    #: tensor-core and TMA instructions in the SASS (``nvdisasm``): warpgroup MMA (``HGMMA``),
    #: warp-level mma.sync (``HMMA``), TMA loads and stores (``UTMALDG``/``UTMASTG``)
    wgmma: int = 0
    mma_sync: int = 0
    tma: int = 0
    #: the distinct N widths of its warpgroup MMAs (``HGMMA.64xNx16``), narrowest first
    wgmma_n: tuple[int, ...] = ()

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch) if _takes_arch() else get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0]


def _takes_arch() -> bool:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    return len(inspect.signature(get_ptxas).parameters) > 0


def _ptxas_report(ptx: str, arch: int) -> dict:
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [_ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{out.stderr}")
        sass = _disassemble(Path(tmp) / "k.cubin")
    text = out.stderr + out.stdout

    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {
        "wgmma": len(re.findall(r"\bHGMMA\.", sass)),
        "wgmma_n": tuple(sorted({int(n) for n in re.findall(r"\bHGMMA\.\d+x(\d+)x\d+", sass)})),
        "mma_sync": len(re.findall(r"\bHMMA\.", sass)),
        "tma": len(re.findall(r"\bUTMA(?:LDG|STG)\b", sass)),
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "smem": grab(r"(\d+) bytes smem"),
    }


def _disassemble(cubin: Path) -> str:
    """The SASS of a cubin, from the ``nvdisasm`` Triton ships (empty if it is missing)."""
    tool = Path(_ptxas(90)).with_name("nvdisasm")
    if not tool.exists():
        return ""
    out = subprocess.run([str(tool), "-c", str(cubin)], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


_TORCH_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64", "int32": "*i32",
              "int64": "*i64", "bool": "*i1"}


def specialize(args: dict, fn=None) -> tuple[dict, dict, dict]:
    """Triton's signature, constexprs and attributes for one launch's arguments, as its
    launcher specializes them: pointers and integers divisible by 16 carry that hint (CUDA
    allocations are 256-byte aligned; meta tensors report address 0), integers equal to 1
    become constants, ``None`` and flags are constexprs. With the kernel ``fn`` (a
    ``JITFunction``), its ``tl.constexpr`` parameters are constants whatever their value's
    type, and its ``do_not_specialize`` parameters get no value hints."""
    params = {p.name: p for p in getattr(fn, "params", [])}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, value) in enumerate(args.items()):
        kind = type(value).__name__
        param = params.get(name)
        if param is not None and param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", getattr(value, "value", value)
            continue
        fixed = param is not None and param.do_not_specialize
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "data_ptr"):
            signature[name], constexprs[name] = "constexpr", value
        elif hasattr(value, "data_ptr"):
            signature[name] = _TORCH_PTR[str(value.dtype).removeprefix("torch.")]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            if value == 1 and not fixed:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not fixed:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            assert kind == "float", kind
            signature[name] = "fp32"
    return signature, constexprs, attrs


def compile_launch(
    fn, args: dict, num_warps: int, num_stages: int | None = None, arch: int = 90, stage: str = ""
) -> KernelReport:
    """Compile one captured launch (a generated function and its arguments) for ``sm_<arch>``:
    the same specialization the launch compiles on a GPU; report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jitted = fn if isinstance(fn, triton.runtime.JITFunction) else triton.jit(fn)
    signature, constexprs, attrs = specialize(args, jitted)
    src = ASTSource(fn=jitted, signature=signature, constexprs=constexprs, attrs=attrs)
    stages = {} if num_stages is None else {"num_stages": num_stages}
    options = {"num_warps": num_warps, "enable_fp_fusion": True, **stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    info = _ptxas_report(compiled.asm["ptx"], arch)
    return KernelReport(
        name=getattr(fn, "__name__", None) or fn.fn.__name__,
        registers=info["registers"],
        spill_stores=info["spill_stores"],
        spill_loads=info["spill_loads"],
        shared=int(getattr(compiled.metadata, "shared", 0)) + info["smem"],
        num_warps=num_warps,
        stage=stage,
        wgmma=info["wgmma"],
        wgmma_n=info["wgmma_n"],
        mma_sync=info["mma_sync"],
        tma=info["tma"],
    )


def format_reports(reports: list[KernelReport]) -> list[str]:
    """A plain-text table of kernel resources."""
    lines = [
        f"{'kernel':<26} {'warps':>5} {'regs':>5} {'spill st/ld':>11} {'shared':>7} {'wgmma':>5} {'mma':>4} {'TMA':>3}"
        f" {'MB read':>8} {'MB written':>10}"
    ]
    for r in reports:
        lines.append(
            f"{r.name:<26} {r.num_warps:>5} {r.registers:>5} {f'{r.spill_stores}/{r.spill_loads}':>11} {r.shared:>7}"
            f" {r.wgmma:>5} {r.mma_sync:>4} {r.tma:>3} {r.bytes_read / 1e6:>8.1f} {r.bytes_written / 1e6:>10.1f}"
        )
    return lines
