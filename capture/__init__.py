"""Capture stage: bytes in from capture files and live interfaces (the kernel ring), nothing parsed yet."""
