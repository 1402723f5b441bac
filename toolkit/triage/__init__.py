"""`triage`: what is wrong with BookGen right now, in seconds, even when parts of it are dead."""
