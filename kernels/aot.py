"""
Ahead-of-time compilation of every kernel for H100 (sm_90), with no GPU (docs/design.md "Running without a GPU").

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs Triton's whole pipeline for Hopper on any
machine: Triton IR -> GPU IR -> LLVM -> PTX -> cubin (through the ptxas Triton picks for sm_90). The PTX shows which
instructions the matrix products became (`wgmma` is Hopper's warpgroup tensor-core instruction; `mma.sync` would be
the older, slower path) and at which shapes, the metadata holds the shared memory the kernel asks for, `ptxas -v` on
the PTX reports registers per thread and spill bytes (local-memory traffic that slows a kernel), and the cubin's SASS
(the machine code, disassembled by the cuobjdump or nvdisasm Triton ships) says how many instructions one iteration
of each inner loop issues: a kernel design change shows in these numbers before it meets a GPU.

Each kernel module lists what to compile in `aot_specs()` (built with `spec` below), always in bf16 at the production
block sizes. The JIT functions must be real `triton.jit` functions, so this runs in a process without
TRITON_INTERPRET=1.
"""

import collections
import concurrent.futures
import importlib
import os
import re
import shutil
import subprocess
import tempfile

TARGET_ARCH = 90  # H100 / H200 (Hopper)
SMEM_LIMIT = 227 * 1024  # shared memory one block may use on compute capability 9.0 (CUDA C++ Programming Guide)
TOOL_TIMEOUT_S = 300  # ptxas on the largest kernel takes seconds; a hung tool must not hang the report


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


# -----------------------------------------------------------------------------
# the CUDA tools, found as Triton finds them

def _triton_lookups(name):
    """Triton's own ways to locate a CUDA tool, newest first; a given Triton version has only some of them. Each
    honours TRITON_<TOOL>_PATH, then the binary bundled in triton/backends/nvidia/bin."""
    from triton.backends.nvidia import compiler
    if name == "ptxas":
        # the ptxas Triton compiles this target with: 3.9 runs its newer "ptxas-blackwell" (CUDA 13) from sm_90 on,
        # 3.4 - 3.8 the plain one below sm_100, and a later version may drop the plain one altogether
        yield lambda: compiler.get_ptxas(TARGET_ARCH).path
    yield lambda: getattr(importlib.import_module("triton.knobs").nvidia, name).path  # 3.3 and later
    yield lambda: compiler._path_to_binary(name)[0]  # 3.0 - 3.2


def _executable(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def find_tool(name):
    """Path of the CUDA tool `name` ("ptxas", "cuobjdump", "nvdisasm") that Triton itself would run for sm_90, or
    None. Triton's helpers first; should a version move or rename them, the places they look in, by hand:
    TRITON_<TOOL>_PATH, the bundled binary (for ptxas also the bundled "ptxas-blackwell", the name 3.7 to 3.9 ship
    their CUDA 13 ptxas under), then a CUDA toolkit on PATH, under $CUDA_HOME or /usr/local/cuda."""
    import triton
    try:
        for lookup in _triton_lookups(name):
            try:
                path = lookup()
            except Exception:  # this version lacks the helper, or the helper found nothing: try the next way
                continue
            if _executable(path):
                return path
    except ImportError:  # a Triton without the nvidia backend: only the places below
        pass
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    candidates = [os.environ.get(f"TRITON_{name.upper()}_PATH"), os.path.join(bundled, name)]
    if name == "ptxas":
        candidates += [os.environ.get("TRITON_PTXAS_BLACKWELL_PATH"), os.path.join(bundled, "ptxas-blackwell")]
    candidates += [shutil.which(name)]
    candidates += [os.path.join(home, "bin", name) for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if home]
    return next((path for path in candidates if _executable(path)), None)


def tool_release(path):
    """'13.1' from a CUDA tool's --version, or '?'."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else "?"


# -----------------------------------------------------------------------------
# what the PTX and the SASS say

WGMMA = re.compile(r"wgmma\.mma_async(?:\.\w+)*?\.(m\d+n\d+k\d+)\b")


def wgmma_shapes(ptx):
    """'m64n64k16 x8, m64n128k16 x4': each wgmma shape in the PTX (in order of first use) and how many wgmma
    instructions of that shape it holds. One instruction is one warpgroup's m x n x k product, so n is the width one
    tensor-core instruction covers; the count is static, every copy of a loop body counted (a kernel with a masked and
    an unmasked loop over the same tiles holds its products twice)."""
    shapes = collections.Counter(WGMMA.findall(ptx))
    return ", ".join(f"{shape} x{n}" for shape, n in shapes.items())


INSTRUCTION = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s*([^;]*);")  # "/*0df0*/  @!P0 BRA 0x3d0 ;"
LABEL = re.compile(r"^\s*([.\w$]+):\s*$")  # nvdisasm's ".L_x_1:" before the instruction it names
# a direct branch: cuobjdump writes the target as an address, nvdisasm as a label, `(.L_x_1)
BRANCH = re.compile(r"\b(?:BRA|JMP)\b[^;]*?(?:`\(([.\w$]+)\)|\b(0x[0-9a-fA-F]+))\s*$")


def sass_loops(sass):
    """Instructions per iteration of each innermost loop in `sass` (the text of `cuobjdump -sass` or `nvdisasm`),
    in code order: [] for straight-line code.

    A loop is a backward branch: its body runs from the branch's target to the branch, and the body's size is the
    instructions in that address range, both sides of any branch inside included (a static count). Several backward
    branches to one target are one loop, as far as the last of them; a loop is innermost when no other loop lies
    within it. Only branches before a function's last EXIT count: ptxas moves slow paths out of line past it (the
    retry loop of a barrier wait, which spins only while the data is late; the jump back to the main line, which is
    no loop at all), and ends with a branch to itself, a trap no thread reaches. Each function's addresses start at 0
    again, so an instruction at address 0 starts a new function."""
    instructions, labels, function = [], {}, -1
    pending = []  # labels that name the next instruction
    for line in sass.splitlines():
        label = LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        found = INSTRUCTION.search(line)
        if not found:
            continue
        address = int(found.group(1), 16)
        if address == 0:
            function += 1
        for name in pending:
            labels[function, name] = address
        pending = []
        instructions.append((function, address, found.group(2).strip()))
    last_exit = {}  # function -> address of its last EXIT
    for function, address, text in instructions:
        if re.search(r"\bEXIT\b", text):
            last_exit[function] = address
    ends = {}  # (function, loop head) -> address of the last backward branch to it
    for function, address, text in instructions:
        branch = BRANCH.search(text)
        if not branch or address > last_exit.get(function, address):
            continue
        target = labels.get((function, branch.group(1))) if branch.group(1) else int(branch.group(2), 16)
        if target is not None and target < address:
            ends[function, target] = max(address, ends.get((function, target), address))
    loops = [(f, head, end) for (f, head), end in ends.items()]
    innermost = [(f, head, end) for f, head, end in loops
                 if not any(g == f and head <= h and e <= end and (h, e) != (head, end) for g, h, e in loops)]
    return [sum(1 for g, address, _ in instructions if g == f and head <= address <= end)
            for f, head, end in sorted(innermost)]


def disassemble(cubin):
    """(SASS text of the cubin, the tool that made it), or (None, None) when neither disassembler is found or both
    fail: the loop column then shows '-' and the rest of the report is unaffected. cuobjdump first, the tool
    triton.tools.disasm uses; nvdisasm prints the same instructions with labels for branch targets."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        for name, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
            tool = find_tool(name)
            if tool is None:
                continue
            try:
                out = subprocess.run([tool, *args, path], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out.returncode == 0 and INSTRUCTION.search(out.stdout):
                return out.stdout, name
    return None, None


# -----------------------------------------------------------------------------
# one row per kernel

def compile_one(spec):
    """Compile one spec for sm_90 with Triton: (the report's row, with what the compile itself tells filled in, and
    the compiled kernel's asm dict), or (the row with its error set, None) when the compile failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    name, config, fn, signature, attrs, constexprs, num_warps, num_stages, matmul = spec
    row = {"kernel": name, "config": config, "matmul": matmul, "registers": None, "spill_bytes": None,
           "shared_bytes": None, "wgmma": None, "wgmma_shapes": None, "loop_sass": None, "disassembler": None,
           "error": None}
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as e:  # a compile failure is a result to report, not a crash of the report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        return row, None
    ptx = compiled.asm["ptx"]
    row["shared_bytes"] = compiled.metadata.shared
    # every product on wgmma: a kernel that also holds an mma.sync has one product on the older path
    row["wgmma"] = "wgmma.mma_async" in ptx and "mma.sync" not in ptx
    row["wgmma_shapes"] = wgmma_shapes(ptx)
    return row, compiled.asm


def measure(row, asm, ptxas):
    """Fill in what the CUDA tools say of a compiled kernel: the loops of its SASS, and registers and spills from
    `ptxas -v` (path `ptxas`, None when there is none) on its PTX. Only subprocesses: it runs in a thread beside the
    next kernel's compile."""
    if asm is None:
        return row
    # the SASS of Triton's own cubin: the code a GPU would run
    sass, row["disassembler"] = disassemble(asm["cubin"])
    row["loop_sass"] = None if sass is None else sass_loops(sass)
    if ptxas is None:
        row["error"] = "no ptxas: set TRITON_PTXAS_PATH or install the CUDA toolkit"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(asm["ptx"])
        # Triton targets sm_90a on Hopper (wgmma exists only there) and allocates registers with
        # --regAllocOptLevel=2 (3.7 on, a ptxas 13 workaround): the same flags give the same registers as its cubin
        try:
            log = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{TARGET_ARCH}a", path,
                                  "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                                 timeout=TOOL_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            row["error"] = f"ptxas: {type(e).__name__}: {e}"[:200]
            return row
    if log.returncode != 0:  # the first error says why; the last line is only "Ptx assembly aborted due to errors"
        said = log.stderr.strip().splitlines() or ["failed"]
        row["error"] = "ptxas: " + next((line for line in said if re.search("error|fatal", line)), said[-1])[:200]
        return row
    text = log.stdout + log.stderr
    row["registers"] = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    row["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
    return row


def problems(row):
    """What makes a row fail the check: no compile, spills, too much shared memory, or a matrix kernel without
    wgmma. The wgmma shapes and the loop sizes are measurements to compare, not pass/fail."""
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


COLUMNS = ["kernel", "config (bf16, sm_90)", "registers", "spill bytes", "shared memory", "wgmma", "wgmma shapes",
           "SASS per loop iteration"]


def cells(row):
    """The row's table cells, COLUMNS' order; '-' where there is nothing to show."""
    wgmma = "n/a (no matmul)" if not row["matmul"] else {True: "yes", False: "NO", None: None}[row["wgmma"]]
    shared = None if row["shared_bytes"] is None else f"{row['shared_bytes'] / 1024:.1f} KiB"
    loops = row["loop_sass"]
    loops = None if loops is None else (", ".join(map(str, loops)) or "no loop")
    values = [row["kernel"], row["config"], row["registers"], row["spill_bytes"], shared, wgmma,
              row["wgmma_shapes"] or None, loops]
    # a '|' inside a cell (a config naming [W_gate|W_up]) is escaped, as markdown needs, so the columns still split
    return ["-" if c is None else str(c).replace("|", "\\|") for c in values]


def report():
    """Compile every spec; returns (rows, table text, ok)."""
    import triton
    ptxas = find_tool("ptxas")
    # Triton compiles in this thread, one kernel at a time; ptxas and the disassembler, a second or so each, run in
    # threads meanwhile, on the other cores
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [pool.submit(measure, *compile_one(spec), ptxas) for spec in specs()]
        rows = [future.result() for future in futures]
    used = sorted({row["disassembler"] for row in rows if row["disassembler"]})
    sass_from = ", ".join(f"{find_tool(name)} (release {tool_release(find_tool(name))})" for name in used)
    lines = [f"triton {triton.__version__}, target sm_{TARGET_ARCH}a, ptxas "
             + (f"{ptxas} (release {tool_release(ptxas)})" if ptxas else "not found"),
             "SASS from " + (sass_from or "no disassembler found (no cuobjdump or nvdisasm): loop sizes shown as -"),
             "wgmma shapes: each m x n x k in the PTX, with how many wgmma instructions of it the PTX holds",
             "SASS per loop iteration: the instructions of every innermost loop (from a backward branch's target to "
             "the branch), in code order, counted statically (both sides of a branch inside the loop)",
             "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    ok = True
    for row in rows:
        found = problems(row)
        ok &= not found
        line = "| " + " | ".join(cells(row)) + " |"
        lines.append(line + ("  FAIL: " + "; ".join(found) if found else ""))
    return rows, "\n".join(lines), ok
