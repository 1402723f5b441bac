"""The incident case: a hash-chained journal of every command, the runbook's checklists, the report."""
