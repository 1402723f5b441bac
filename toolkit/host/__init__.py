"""Reading the host safely: files, processes, system facts, host programs."""
