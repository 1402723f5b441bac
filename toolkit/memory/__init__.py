"""Memory: processes as ELF core files, physical memory as LiME images (toolkit.evidence.collectors.memory)."""
