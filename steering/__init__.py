"""Test-time steering with the critic (guidance, best-of-N, SMC): see issue #5."""
