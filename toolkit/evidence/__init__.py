"""Evidence capture: collectors, the streaming bundle writer, manifest, custody, verify and extract."""
