"""Test helpers: real servers on loopback ports (in a thread or as a process) and test job types."""
