"""Encryption and signatures in formats that standard tools open: age v1 and OpenSSH SSHSIG."""
