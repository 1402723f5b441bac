"""The ELF core file format, as Linux writes one for a crashed process and gdb and readelf read it.

Invariants:
- Pure format: nothing here reads a process; toolkit.memory.process supplies what goes in.
- The layout is fixed before the first byte of memory is read (the size of a tar member is said first):
  the ELF header, then the program headers (PT_NOTE first, then one PT_LOAD per mapping in address order),
  then the notes, then each segment's bytes at a page-aligned offset.
- A mapping left out (not readable, over the limit) is still a PT_LOAD, with p_filesz 0 and p_memsz its size, as
  the kernel writes a mapping it does not dump: the address space stays whole in the file.
- Notes: NT_PRSTATUS per thread (the registers this kit can know without ptrace: the stack and instruction
  pointers and the syscall's number and arguments from /proc/PID/task/TID/syscall; the rest zero), NT_PRPSINFO,
  NT_AUXV, NT_FILE (each file mapping's name: `info proc mappings` in gdb shows them).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS, NT_PRPSINFO, NT_AUXV, NT_FILE = 1, 3, 6, 0x46494C45
EM_X86_64, EM_AARCH64 = 62, 183
PN_XNUM = 0xFFFF
EHDR_SIZE, PHDR_SIZE = 64, 56
MAX_SEGMENTS = PN_XNUM - 2  # beyond this the count needs an extra section header: the rest are left out

# per machine: e_machine, the general registers' count, where the stack and instruction pointers are in them,
# where the syscall number and its six arguments go
MACHINES = {
    # user_regs_struct: r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss
    #                   fs_base gs_base ds es fs gs
    "x86_64": {"e_machine": EM_X86_64, "registers": 27, "sp": 19, "pc": 16, "nr": 15,
               "args": (14, 13, 12, 7, 9, 8)},
    # user_pt_regs: x0..x30 sp pc pstate
    "aarch64": {"e_machine": EM_AARCH64, "registers": 34, "sp": 31, "pc": 32, "nr": 8, "args": (0, 1, 2, 3, 4, 5)},
}


@dataclass
class Thread:
    tid: int
    signal: int = 0
    sp: Optional[int] = None
    pc: Optional[int] = None
    syscall: Optional[int] = None  # the number it is blocked in, if any
    arguments: Sequence[int] = ()


@dataclass
class ProcessInfo:
    pid: int
    ppid: int
    pgrp: int
    sid: int
    uid: int
    gid: int
    state: str  # one letter, as /proc/PID/stat says
    nice: int
    flags: int
    name: str  # comm
    arguments: str  # cmdline, spaces between
    threads: List[Thread] = field(default_factory=list)
    auxv: bytes = b""


@dataclass
class Segment:
    start: int
    end: int
    flags: int  # PF_R | PF_W | PF_X
    file_size: int  # bytes stored (0: left out); the stored bytes are always the segment's first ones
    path: str = ""  # the mapped file, "" for anonymous memory
    file_offset: int = 0  # the mapping's offset in that file
    offset: int = 0  # where its bytes are in the core (set by layout)


def _note(name: bytes, note_type: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    header = struct.pack("<III", len(name_z), len(desc), note_type)
    return header + name_z + b"\0" * (-len(name_z) % 4) + desc + b"\0" * (-len(desc) % 4)


def _prstatus(machine: str, process: ProcessInfo, thread: Thread) -> bytes:
    spec = MACHINES[machine]
    registers = [0] * spec["registers"]
    if thread.sp is not None:
        registers[spec["sp"]] = thread.sp
    if thread.pc is not None:
        registers[spec["pc"]] = thread.pc
    if thread.syscall is not None:
        registers[spec["nr"]] = thread.syscall & 0xFFFFFFFFFFFFFFFF
        for index, value in zip(spec["args"], thread.arguments):
            registers[index] = value & 0xFFFFFFFFFFFFFFFF
    # elf_siginfo (signo, code, errno), pr_cursig + pad, sigpend, sighold, pid, ppid, pgrp, sid, 4 timevals
    head = struct.pack("<iiihxxQQiiii", thread.signal, 0, 0, thread.signal, 0, 0, thread.tid, process.ppid,
                       process.pgrp, process.sid) + b"\0" * 64
    body = struct.pack("<%dQ" % spec["registers"], *registers)
    tail = struct.pack("<i", 0)  # pr_fpvalid: no floating-point registers
    raw = head + body + tail
    return raw + b"\0" * (-len(raw) % 8)


def _prpsinfo(process: ProcessInfo) -> bytes:
    state = process.state[:1] or "R"
    number = "RSDTZW".find(state)
    return struct.pack("<bcbb4xQIIiiii16s80s", max(number, 0), state.encode("ascii", "replace"),
                       1 if state == "Z" else 0, max(-128, min(127, process.nice)), process.flags,
                       process.uid, process.gid, process.pid, process.ppid, process.pgrp, process.sid,
                       process.name.encode("utf-8", "replace")[:15], process.arguments.encode("utf-8", "replace")[:79])


def _file_note(segments: Sequence[Segment], page_size: int) -> bytes:
    files = [s for s in segments if s.path]
    table = b"".join(struct.pack("<QQQ", s.start, s.end, s.file_offset // page_size) for s in files)
    names = b"".join(s.path.encode("utf-8", "surrogateescape") + b"\0" for s in files)
    return struct.pack("<QQ", len(files), page_size) + table + names


def notes(machine: str, process: ProcessInfo, segments: Sequence[Segment], page_size: int) -> bytes:
    """The PT_NOTE segment's content, in the order Linux writes it (the first thread's PRSTATUS first)."""
    threads = process.threads or [Thread(process.pid)]
    threads = sorted(threads, key=lambda t: (t.tid != process.pid, t.tid))
    out = [_note(b"CORE", NT_PRSTATUS, _prstatus(machine, process, threads[0])),
           _note(b"CORE", NT_PRPSINFO, _prpsinfo(process))]
    if process.auxv:
        out.append(_note(b"CORE", NT_AUXV, process.auxv))
    out.append(_note(b"CORE", NT_FILE, _file_note(segments, page_size)))
    out.extend(_note(b"CORE", NT_PRSTATUS, _prstatus(machine, process, thread)) for thread in threads[1:])
    return b"".join(out)


@dataclass
class Layout:
    head: bytes  # the ELF header, program headers, notes and the padding up to the first segment
    segments: List[Segment]
    size: int  # of the whole file


def layout(machine: str, process: ProcessInfo, segments: List[Segment], page_size: int) -> Layout:
    """Fix every offset: the head, then each stored segment page-aligned, in address order."""
    if machine not in MACHINES:
        raise ValueError("no ELF core layout for the %s machine" % machine)
    segments = sorted(segments, key=lambda s: s.start)[:MAX_SEGMENTS]
    note_bytes = notes(machine, process, segments, page_size)
    count = 1 + len(segments)
    note_offset = EHDR_SIZE + PHDR_SIZE * count
    data_start = note_offset + len(note_bytes)
    data_start += -data_start % page_size
    offset = data_start
    for segment in segments:
        segment.offset = offset
        offset += segment.file_size
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8  # 64-bit, little-endian, version 1, System V ABI
    header = ident + struct.pack("<HHIQQQIHHHHHH", ET_CORE, MACHINES[machine]["e_machine"], 1, 0, EHDR_SIZE, 0, 0,
                                 EHDR_SIZE, PHDR_SIZE, count, 0, 0, 0)
    program = [struct.pack("<IIQQQQQQ", PT_NOTE, 0, note_offset, 0, 0, len(note_bytes), 0, 4)]
    for segment in segments:
        program.append(struct.pack("<IIQQQQQQ", PT_LOAD, segment.flags, segment.offset, segment.start, 0,
                                   segment.file_size, segment.end - segment.start, page_size))
    head = header + b"".join(program) + note_bytes
    head += b"\0" * (data_start - len(head))
    return Layout(head, segments, offset)


def flags_of(permissions: str) -> int:
    """PF_* from a maps line's permissions (rwxp)."""
    return (PF_R if "r" in permissions else 0) | (PF_W if "w" in permissions else 0) | \
        (PF_X if "x" in permissions else 0)


def summary(core_layout: Layout) -> Dict[str, int]:
    stored = [s for s in core_layout.segments if s.file_size]
    return {"segments": len(core_layout.segments), "segments_stored": len(stored),
            "bytes_stored": sum(s.file_size for s in stored), "size": core_layout.size}
