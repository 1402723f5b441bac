"""Memory: the whole physical RAM as a LiME image (`--memory`, `--profile full`) with what an analyst needs to read
it, and the memory of the processes the findings mark (and of `--process-memory PID`) as ELF core files.

Invariants:
- Memory goes straight from the kernel into the bundle's hash -> compression -> age stream: no plaintext copy is
  written anywhere, not even a temporary file.
- `memory` runs first of all collectors (before anything else stirs memory much); `process-memory` runs right
  after `processes` and `network`, whose facts say which processes are marked.
- A source that does not exist or is refused is one line (degraded, on screen and in the manifest) and the
  capture goes on; it is never a failure of the capture.
- Bounded: a core holds at most --process-memory-limit bytes of memory and all cores together at most
  --process-memory-total; the RAM image is cut into parts of LIME_PART (each a whole LiME file), so memory use
  does not grow with the RAM size.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Dict, Iterable, List, Set

from toolkit import utc
from toolkit.evidence.collectors.base import CollectionContext, Collector, Emitter
from toolkit.host.hostfs import HostFS, Refused, kernel_bytes

MEMORY_DIR = "memory/"
LIME_NAME = MEMORY_DIR + "physical.lime"
LIME_PART = 8 << 20  # bytes a part: the collector holds two at most (peak RSS goal 150 MiB, whatever the RAM)
# the findings that mark a process whose memory is taken (every finding that names processes by pid is one of
# these; listed so a new rule is a decision, not an accident)
MARKING = ("process-deleted-binary", "process-from-tmp", "process-memfd-code", "process-deleted-library",
           "process-ld-preload", "hidden-pids", "unexpected-listener", "container-unexpected-listener",
           "container-outbound")
KERNEL_FILES = ("/boot/System.map-{release}", "/boot/config-{release}", "/boot/vmlinuz-{release}",
                "/usr/lib/debug/boot/vmlinux-{release}", "/lib/modules/{release}/modules.dep")
KERNEL_STREAMS = ("/proc/kallsyms", "/proc/modules", "/proc/version", "/sys/kernel/btf/vmlinux",
                  "/sys/kernel/vmcoreinfo", "/proc/iomem", "/proc/cmdline")


def core_member(pid: int, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:32] or "process"
    return "%sprocesses/%d-%s.core" % (MEMORY_DIR, pid, safe)


def marked_pids(facts: Dict[str, List[Dict[str, Any]]]) -> Dict[int, List[str]]:
    """pid -> the ids of the findings that mark it, from the facts gathered so far."""
    from toolkit.evidence.findings import compute

    marked: Dict[int, List[str]] = {}
    for item in compute(facts):
        if item["id"] not in MARKING:
            continue
        details = item.get("details") or {}
        for pid in list(details.get("pids") or []) + ([details["pid"]] if details.get("pid") else []):
            ids = marked.setdefault(int(pid), [])
            if item["id"] not in ids:
                ids.append(item["id"])
    return marked


def _ours() -> Set[int]:
    """This process and its ancestors: the kit never dumps itself or what runs it."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            text = kernel_bytes("/proc/%d/stat" % pid, 4096).decode("utf-8", "replace")
            pid = int(text[text.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class ProcessMemoryCollector(Collector):
    name = "process-memory"
    rank = 25
    budget_seconds = 300.0
    description = ("the memory of every process a finding marks and of --process-memory PID, as an ELF core "
                   "file (gdb, readelf) with its gaps recorded; --freeze stops each for its dump")

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        from toolkit.memory import process

        marked = marked_pids(context.facts)
        for pid in context.process_memory:
            marked.setdefault(pid, []).insert(0, "asked (--process-memory)")
        ours = _ours()
        total = context.process_memory_total
        dumped = []
        for pid in sorted(marked):
            why = marked[pid]
            if pid in ours:
                emit.skip("/proc/%d/mem" % pid, "the kit's own process or an ancestor: not dumped", "skip")
                continue
            if total <= 0:
                emit.skip("/proc/%d/mem" % pid, "not dumped: the total limit of %d bytes for process memory is "
                          "used up (--process-memory-total)" % context.process_memory_total, "limit")
                continue
            try:
                dump, stream = process.dump(pid, min(context.process_memory_limit, total), context.freeze)
            except process.NoUserMemory as error:
                emit.log(str(error))
                continue
            except process.NotReadable as error:
                emit.skip("/proc/%d/mem" % pid, str(error), "skip" if "gone" in str(error) or "exited" in
                          str(error) else "error")
                continue
            except ValueError as error:  # a machine with no core layout
                emit.skip("/proc/%d/mem" % pid, str(error), "limited")
                continue
            if not dump.layout.segments:
                dump.finish()
                emit.log("pid %d has no user memory (a kernel thread): no core" % pid)
                continue
            member = core_member(pid, dump.process.name)
            try:
                notes = emit.sized(member, dump.layout.size, stream, "/proc/%d/mem along /proc/%d/maps, as an ELF "
                                   "core file%s" % (pid, pid, " (process frozen with SIGSTOP)" if
                                                    dump.freeze.get("frozen") else ""), "/proc/%d/mem" % pid,
                                   {"pid": pid, "marked_by": why})
            finally:
                stream.close()
                dump.finish()  # continues a frozen process, also when the capture abandons this collector
            if "not_stored" in notes:  # no room left on the output medium (a limit entry says so)
                continue
            total -= dump.layout.size
            record = dict(dump.record(), marked_by=why, member=member, notes=notes)
            emit.json(member + ".json", record, "what the core holds: mappings, gaps, what was left out, freeze")
            if dump.gaps:
                emit.log("pid %d: %d unreadable ranges stored as zeros (listed in %s.json)" % (
                    pid, len(dump.gaps), member))
            over = [m for m in dump.left_out if "limit" in m["reason"]]
            if over:
                emit.skip("/proc/%d/mem" % pid, "%d mappings (%d bytes) over the process memory limit left out of "
                          "the core (listed in %s.json)" % (len(over), sum(m["bytes"] for m in over), member),
                          "limit")
            emit.fact("process_core", {"pid": pid, "member": member, "marked_by": why,
                                       "bytes": dump.layout.size, "gaps": len(dump.gaps),
                                       "frozen": bool(dump.freeze.get("frozen"))}, member)
            dumped.append(pid)
        emit.log("%d process cores: %s" % (len(dumped), ", ".join(map(str, dumped)) or "none"))


class PhysicalMemoryCollector(Collector):
    name = "memory"
    rank = 1
    profiles = ("full",)
    budget_seconds = 3600.0
    description = ("the whole physical RAM (System RAM of /proc/iomem through /proc/kcore, else /dev/crash, else "
                   "/dev/mem) as a LiME image in parts, zero pages left out; and the kernel's symbols, config, "
                   "BTF and modules, for a symbol table on the workstation")

    def run(self, context: CollectionContext, emit: Emitter) -> None:
        from toolkit.memory import lime, physical

        started = time.time()
        try:
            ranges = physical.system_ram(kernel_bytes("/proc/iomem", 4 << 20).decode("ascii", "replace"))
        except (OSError, Refused) as error:
            ranges = []
            emit.refusal("/proc/iomem", error)
        document: Dict[str, Any] = {"ranges": [{"first": "%#x" % a, "last": "%#x" % b} for a, b in ranges],
                                    "lockdown": physical.lockdown(), "machine": platform.machine(),
                                    "kernel": platform.release(), "started_at": utc.iso_micro(started)}
        if not ranges or not any(last for _, last in ranges):
            why = "/proc/iomem shows no System RAM addresses%s" % (" (not root)" if os.geteuid() else "")
            self._refused(emit, document, why)
        else:
            try:
                source = physical.open_source(ranges)
            except physical.Unavailable as error:
                self._refused(emit, document, str(error))
            else:
                try:
                    self._image(emit, source, ranges, document, lime, physical)
                finally:
                    source.close()
        self._kernel_files(emit)

    @staticmethod
    def _refused(emit: Emitter, document: Dict[str, Any], why: str) -> None:
        emit.degraded("memory", "no image of physical memory", why)
        emit.skip("physical memory", "not imaged: %s" % why, "limited")
        emit.json(MEMORY_DIR + "physical.json", dict(document, source=None, refused=why),
                  "why physical memory was not imaged")

    @staticmethod
    def _image(emit: Emitter, source, ranges, document: Dict[str, Any], lime, physical) -> None:
        stats = lime.Stats()
        names: List[str] = []
        for part in lime.parts(physical.chunks(source, ranges), LIME_PART, stats):
            name = "%s.part%04d" % (LIME_NAME, len(names))
            if not emit.generated(name, part, "%s, System RAM ranges of /proc/iomem, LiME records (part %d: a "
                                  "whole LiME file; `cat %s.part* > %s` joins them)" % (
                                      source.path, len(names), LIME_NAME, os.path.basename(LIME_NAME)), source.path):
                document["cut_short"] = "part %d and the rest of RAM not stored: no room left on the output medium" \
                    % len(names)
                emit.degraded("memory", "the image of physical memory is cut short", document["cut_short"])
                break
            names.append(name)
        ram = sum(last - first + 1 for first, last in ranges)
        document.update(source=source.path, refused_before=source.refused, parts=names, records=stats.records,
                        ram_bytes=ram, bytes_read=stats.bytes_read, bytes_stored=stats.bytes_stored,
                        zero_pages_left_out=stats.zero_pages,
                        unreadable=[{"start": "%#x" % a, "bytes": n, "reason": why} for a, n, why in stats.unreadable],
                        unreadable_bytes=stats.unreadable_bytes, unreadable_runs_not_listed=stats.unreadable_unlisted,
                        ended_at=utc.iso_micro(time.time()),
                        join="cat %s.part* > physical.lime (each part is a LiME file too)" % LIME_NAME)
        emit.json(MEMORY_DIR + "physical.json", document, "how the image was made: source, ranges, records, "
                  "zero pages left out, unreadable pages")
        if stats.unreadable:
            emit.log("%d unreadable runs of physical memory (listed in memory/physical.json)" % len(stats.unreadable))
        emit.fact("memory_image", {"source": source.path, "parts": names, "bytes_stored": stats.bytes_stored,
                                   "ram_bytes": ram}, MEMORY_DIR + "physical.json")

    @staticmethod
    def _kernel_files(emit: Emitter) -> None:
        """The running kernel's symbols, config, image, BTF, module list: what dwarf2json or btf2json need to
        build volatility3's symbol table on the workstation."""
        release = platform.release()
        for template in KERNEL_FILES:
            emit.file(template.format(release=release), 1 << 30)
        kernel = HostFS("/")  # the running kernel's files, whatever --root says; a FIFO mounted over one is refused
        for path in KERNEL_STREAMS:
            try:
                opened = kernel.open_file(path)
            except FileNotFoundError:
                emit.skip(path, "absent on this kernel", "skip")
                continue
            except Refused as error:
                emit.refusal(path, error)
                continue
            except OSError as error:
                emit.skip(path, error.strerror or str(error), "limited")
                continue
            with opened:
                emit.stream(MEMORY_DIR + "kernel/" + path.strip("/").replace("/", "_"), _pieces(opened),
                            "read from the running kernel (%s)" % path)


def _pieces(opened) -> Iterable[bytes]:
    """A kernel file's bytes as they come (/proc files say size 0), to at most 1 GiB."""
    total = 0
    while total < 1 << 30:
        data = opened.read(1 << 20)
        if not data:
            return
        total += len(data)
        yield data
