"""Host hardening: checks (check, plan), apply with an undo bundle, rollback, the sshd dead-man switch,
containment."""
