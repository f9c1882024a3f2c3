"""Claims about kernels/aot.py that need no compile: the SASS loop counter reads both disassemblers' output, the
wgmma shapes come from the PTX, the CUDA tools are found where Triton finds them (and without Triton's helpers), and
the report degrades to '-' without a disassembler. The compile of every kernel for H100 itself:
tests/test_kernels.py::test_every_kernel_compiles_for_h100_without_spills_and_with_wgmma."""

import os
import re
import stat

from kernels import aot  # imports no triton: test_kernels.py needs it imported first under TRITON_INTERPRET=1

# One function with an outer loop around an inner one, a forward branch, a second loop reached again by a
# `continue`-like branch, a barrier wait whose retry loop ptxas put out of line past the EXIT, and the trap a kernel
# ends with; then a second function, whose addresses start at 0 again, with a slow path past its EXIT that jumps back.
# Innermost loops: 0x30-0x50 (3 instructions), 0x80-0xb0 (4; the branch at 0x90 is the same loop), and 0x0-0x10
# of the second function (2). The outer loop 0x20-0x60 holds the inner one, the retry loop at 0xd0 spins only while
# the barrier is not ready, and the jumps back from past an EXIT close no loop: none of them is counted.
CUOBJDUMP = """
\tcode for sm_90a
\t\tFunction : first
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
                                                                           /* 0x000e300000000800 */
        /*0010*/               @P0 BRA 0xc0 ;                              /* 0x0000000800d00947 */
                                                                           /* 0x000fea0003800000 */
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;                 /* 0x0000000102027810 */
        /*0030*/                   MOV R3, RZ ;                            /* 0x000000ff00037202 */
        /*0040*/                   FADD R4, R4, R3 ;                       /* 0x0000000304047221 */
        /*0050*/               @P1 BRA 0x30 ;                              /* 0xfffffffc00741947 */
        /*0060*/               @P2 BRA 0x20 ;                              /* 0xfffffffc00742947 */
        /*0070*/              @!P5 BRA 0xd0 ;                              /* 0x0000000000145947 */
        /*0080*/                   LDG.E R6, desc[UR4][R8.64] ;            /* 0x0000000408067981 */
        /*0090*/               @P3 BRA 0x80 ;                              /* 0xfffffffc00743947 */
        /*00a0*/                   FMUL R6, R6, R6 ;                       /* 0x0000000606067220 */
        /*00b0*/               @P4 BRA 0x80 ;                              /* 0xfffffffc00744947 */
        /*00c0*/                   EXIT ;                                  /* 0x000000000000794d */
        /*00d0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P5, [UR4+0x100], R3 ;  /* 0x0001000304ff75a7 */
        /*00e0*/              @!P5 BRA 0xd0 ;                              /* 0xfffffffc00f8d947 */
        /*00f0*/                   BRA 0x80 ;                              /* 0xffffffe000e07947 */
        /*0100*/                   BRA 0x100;                              /* 0xfffffffc00fc7947 */
\t\t..........

\t\tFunction : second
        /*0000*/                   S2R R0, SR_TID.X ;                      /* 0x0000000000007919 */
        /*0010*/               @P0 BRA 0x0 ;                               /* 0xfffffffc00740947 */
        /*0020*/               @P1 BRA 0x50 ;                              /* 0x0000000000081947 */
        /*0030*/                   MOV R1, R0 ;                            /* 0x0000000000017202 */
        /*0040*/                   EXIT ;                                  /* 0x000000000000794d */
        /*0050*/                   MOV R2, R0 ;                            /* 0x0000000000027202 */
        /*0060*/                   BRA 0x30 ;                              /* 0xfffffffc00f07947 */
        /*0070*/                   BRA 0x70;                               /* 0xfffffffc00fc7947 */
"""

NVDISASM = """
//--------------------- .text.first --------------------------
\t.section\t.text.first,"ax",@progbits
first:
.text.first:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA `(.L_x_3) ;
.L_x_1:
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_0:
        /*0030*/                   MOV R3, RZ ;
        /*0040*/                   FADD R4, R4, R3 ;
        /*0050*/               @P1 BRA `(.L_x_0) ;
        /*0060*/               @P2 BRA `(.L_x_1) ;
        /*0070*/              @!P5 BRA `(.L_x_4) ;
.L_x_2:
        /*0080*/                   LDG.E R6, desc[UR4][R8.64] ;
        /*0090*/               @P3 BRA `(.L_x_2) ;
        /*00a0*/                   FMUL R6, R6, R6 ;
        /*00b0*/               @P4 BRA `(.L_x_2) ;
.L_x_3:
        /*00c0*/                   EXIT ;
.L_x_4:
        /*00d0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P5, [UR4+0x100], R3 ;
        /*00e0*/              @!P5 BRA `(.L_x_4) ;
        /*00f0*/                   BRA `(.L_x_2) ;
.L_x_5:
        /*0100*/                   BRA `(.L_x_5);
.L_x_6:
//--------------------- .text.second --------------------------
second:
.text.second:
.L_x_7:
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 BRA `(.L_x_7) ;
        /*0020*/               @P1 BRA `(.L_x_9) ;
.L_x_8:
        /*0030*/                   MOV R1, R0 ;
        /*0040*/                   EXIT ;
.L_x_9:
        /*0050*/                   MOV R2, R0 ;
        /*0060*/                   BRA `(.L_x_8) ;
.L_x_10:
        /*0070*/                   BRA `(.L_x_10);
"""


def test_sass_loop_counter_on_both_disassemblers_output():
    assert aot.sass_loops(CUOBJDUMP) == [3, 4, 2]
    assert aot.sass_loops(NVDISASM) == [3, 4, 2]
    main_line = [line for line in CUOBJDUMP.splitlines() if not re.search(r"@P[0-4] BRA", line)]
    assert aot.sass_loops("\n".join(main_line)) == []  # only what lies past an EXIT branches back: no loop


def test_wgmma_shapes_from_ptx():
    ptx = """
        wgmma.fence.sync.aligned;
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1, %r2}, %rd1, %rd2, p, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r3}, %rd3, %rd4, p, 1, 1, 0, 0;
        wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r1, %r2}, %rd5, %rd6, p, 1, 1, 0, 1;
        wgmma.commit_group.sync.aligned;
        wgmma.wait_group.sync.aligned 0;
    """
    assert aot.wgmma_shapes(ptx) == "m64n128k16 x2, m64n64k16 x1"
    assert aot.wgmma_shapes("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == ""


def fake_tool(directory, name, release="99.9"):
    """An executable that answers --version as the CUDA tools do."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


def test_tools_are_found_where_triton_looks(tmp_path, monkeypatch):
    import triton  # here, not at the top: see the import of aot
    # Triton's own helper honours its variable (3.9 compiles sm_90 with the tool named by TRITON_PTXAS_BLACKWELL_PATH)
    ptxas = fake_tool(str(tmp_path / "cuda"), "ptxas")
    monkeypatch.setenv("TRITON_PTXAS_PATH", ptxas)
    monkeypatch.setenv("TRITON_PTXAS_BLACKWELL_PATH", ptxas)
    assert aot.find_tool("ptxas") == ptxas and aot.tool_release(ptxas) == "99.9"
    # a Triton without those helpers: the same places by hand, then the CUDA toolkit
    monkeypatch.setattr(aot, "_triton_lookups", lambda name: iter(()))
    assert aot.find_tool("ptxas") == ptxas
    monkeypatch.setattr(triton, "__file__", str(tmp_path / "no_bundled_tools" / "__init__.py"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "toolkit"))
    nvdisasm = fake_tool(str(tmp_path / "toolkit" / "bin"), "nvdisasm")
    monkeypatch.delenv("TRITON_NVDISASM_PATH", raising=False)
    assert aot.find_tool("nvdisasm") == nvdisasm
    assert aot.find_tool("no-such-cuda-tool") is None


def test_no_disassembler_shows_dash_and_fails_nothing(monkeypatch):
    assert aot.disassemble(b"not a cubin") == (None, None)  # the tools, if here, refuse it: no SASS, no crash
    monkeypatch.setattr(aot, "find_tool", lambda name: None)
    assert aot.disassemble(b"\x7fELF") == (None, None)
    row = {"kernel": "k", "config": "c", "matmul": False, "registers": 32, "spill_bytes": 0, "shared_bytes": 0,
           "wgmma": False, "wgmma_shapes": "", "loop_sass": None, "disassembler": None, "error": None}
    assert aot.cells(row)[-2:] == ["-", "-"] and aot.problems(row) == []
    assert aot.cells({**row, "loop_sass": []})[-1] == "no loop"
    assert aot.cells({**row, "loop_sass": [163, 130]})[-1] == "163, 130"
