"""
Ahead-of-time compilation of every kernel for H100 (sm_90), with no GPU (docs/design.md "Running without a GPU").

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs Triton's whole pipeline for Hopper on any
machine: Triton IR -> GPU IR -> LLVM -> PTX -> cubin (through the ptxas bundled in triton's nvidia backend). The
PTX shows which instructions the matrix products became (`wgmma` is Hopper's warpgroup tensor-core instruction;
`mma.sync` would be the older, slower path), the metadata holds the shared memory the kernel asks for, and
`ptxas -v` on the PTX reports registers per thread and spill bytes (local-memory traffic that slows a kernel).

Each kernel module lists what to compile in `aot_specs()` (built with `spec` below), always in bf16 at the production
block sizes. The JIT functions must be real `triton.jit` functions, so this runs in a process without
TRITON_INTERPRET=1.
"""

import os
import re
import subprocess
import tempfile

TARGET_ARCH = 90  # H100 / H200 (Hopper)
SMEM_LIMIT = 227 * 1024  # shared memory one block may use on compute capability 9.0 (CUDA C++ Programming Guide)


def spec(name, config, fn, pointers, constexprs, num_warps, num_stages, matmul, floats=(), small=()):
    """One kernel to compile. `pointers` maps each pointer argument to its element type ("bf16", "fp32", "i64");
    `floats` names the float scalars; `small` the ints not divisible by 16 at production shapes (the 4 query heads
    per K/V head, the 8 experts). Every other argument is an int32 that Triton, at run time, would see to be
    divisible by 16 (pointers, strides and lengths of production shapes), so it gets the same hint here: without it
    the compiler cannot prove 16-byte alignment and emits narrower loads than the real kernel would."""
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "*" + pointers[arg] if arg in pointers else "i32"
            if arg not in small:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return name, config, fn, signature, attrs, constexprs, num_warps, num_stages, matmul


def specs():
    from kernels import attention, cross_entropy, moe, rmsnorm
    return attention.aot_specs() + rmsnorm.aot_specs() + cross_entropy.aot_specs() + moe.aot_specs()


def ptxas_path():
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_one(spec):
    """Compile one spec for sm_90; returns a dict row for the report (error set when it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, config, fn, signature, attrs, constexprs, num_warps, num_stages, matmul = spec
    row = {"kernel": name, "config": config, "matmul": matmul, "registers": None, "spill_bytes": None,
           "shared_bytes": None, "wgmma": None, "error": None}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # a compile failure is a result to report, not a crash of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        return row
    ptx = compiled.asm["ptx"]
    row["shared_bytes"] = compiled.metadata.shared
    # every product on wgmma: a kernel that also holds an mma.sync has one product on the older path
    row["wgmma"] = "wgmma.mma_async" in ptx and "mma.sync" not in ptx
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = "sm_90a"  # Triton targets sm_90a on Hopper: wgmma exists only there
        log = subprocess.run([ptxas_path(), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if log.returncode != 0:
        row["error"] = "ptxas: " + log.stderr.strip().splitlines()[-1][:200]
        return row
    text = log.stdout + log.stderr
    row["registers"] = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    row["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
    return row


def problems(row):
    """What makes a row fail the check: no compile, spills, too much shared memory, or a matrix kernel without
    wgmma."""
    if row["error"]:
        return [row["error"]]
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes")
    if row["shared_bytes"] > SMEM_LIMIT:
        found.append(f"needs {row['shared_bytes']} bytes of shared memory")
    if row["matmul"] and not row["wgmma"]:
        found.append("multiplies matrices without wgmma")
    return found


def report():
    """Compile every spec; returns (rows, table text, ok)."""
    import triton
    rows = [compile_one(spec) for spec in specs()]
    ptxas = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    version = ptxas[-1] if ptxas else "ptxas"
    lines = [f"triton {triton.__version__}, ptxas {version}, target sm_{TARGET_ARCH}a", "",
             "| kernel | config (bf16, sm_90) | registers | spill bytes | shared memory | wgmma |",
             "|---|---|---|---|---|---|"]
    ok = True
    for row in rows:
        found = problems(row)
        ok &= not found
        wgmma = "n/a (no matmul)" if not row["matmul"] else ("yes" if row["wgmma"] else "NO")
        shared = "-" if row["shared_bytes"] is None else f"{row['shared_bytes'] / 1024:.1f} KiB"
        cells = [row["kernel"], row["config"], row["registers"], row["spill_bytes"], shared, wgmma]
        line = "| " + " | ".join("-" if c is None else str(c) for c in cells) + " |"
        lines.append(line + ("  FAIL: " + "; ".join(found) if found else ""))
    return rows, "\n".join(lines), ok
