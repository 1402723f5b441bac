"""Host hardening: checks with check and plan (apply, rollback and containment are still to come)."""
